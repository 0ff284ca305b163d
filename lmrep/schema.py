"""The result row, declared once: what each column is and how results, summary, report and W&B show it.

A row of `results.jsonl` is one (checkpoint step, block, mask, prompt, context).
Each column is declared here with its kind, where its value comes from, how it
aggregates over the prompts of a summary cell, and whether the HTML report and
the W&B table show it. `ProbeResult.rows()`, `runs.probe_rows`,
`metrics.summarize`, `report` and the W&B table all iterate over `COLUMNS`, so a
new column is one declaration here plus its computation (a `derive` function of
the engine's per-row values, or a value the engine or a solver returns under
the column's name; `SOLVER` for a column only one solver writes, absent from
the other methods' rows and None in their summary cells).

Every row also carries the probe settings (`ProbeSettings.as_record()`), which
are documented on `ProbeSettings` itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

# Bumped whenever a column's meaning or the row layout changes: it is part of the settings id,
# so rows written under another schema are re-solved (refused for that output), never mixed.
SCHEMA_VERSION = 2

Reducer = Callable[[Sequence[Mapping[str, Any]]], Any]


def _present(rows: Sequence[Mapping[str, Any]], name: str) -> list[float]:
    """The values of `name` in rows that have one (missing, None and NaN left out)."""
    values = []
    for row in rows:
        value = row.get(name)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            values.append(float(value))
    return values


def total(name: str) -> Reducer:
    """Sum over prompts (token counts)."""
    return lambda rows: int(sum(_present(rows, name)))


def pooled(correct: str, count: str) -> Reducer:
    """Pooled ratio sum(correct) / sum(count): a token-weighted mean, None when no tokens."""

    def reduce(rows: Sequence[Mapping[str, Any]]) -> float | None:
        n = sum(_present(rows, count))
        return sum(_present(rows, correct)) / n if n else None

    return reduce


BOOTSTRAP_SAMPLES = 1000  # resamples of the prompts behind a pooled accuracy's interval
INTERVAL = 0.95  # coverage of the intervals in summaries and plots


def pooled_interval(correct: str, count: str, side: int) -> Reducer:
    """One end (side 0: low, 1: high) of a 95% bootstrap interval of a pooled ratio over the prompts.

    The prompts are resampled (seeded, so reports repeat), not the tokens: tokens of one
    prompt are not independent draws. One prompt gives a zero-width interval.
    """

    def reduce(rows: Sequence[Mapping[str, Any]]) -> float | None:
        pairs = [(float(r[correct]), float(r[count])) for r in rows
                 if r.get(correct) is not None and r.get(count)]
        if not pairs:
            return None
        hits, totals = np.array(pairs).T
        picks = np.random.default_rng(0).integers(0, len(pairs), size=(BOOTSTRAP_SAMPLES, len(pairs)))
        ratios = hits[picks].sum(1) / totals[picks].sum(1)
        return float(np.quantile(ratios, (1 - INTERVAL) / 2 if side == 0 else (1 + INTERVAL) / 2))

    return reduce


def pooled_present(correct: str, count: str) -> Reducer:
    """Pooled ratio over the rows that have `correct` (a column only some solvers write); None when none has."""

    def reduce(rows: Sequence[Mapping[str, Any]]) -> float | None:
        having = [r for r in rows if r.get(correct) is not None]
        n = sum(_present(having, count))
        return sum(_present(having, correct)) / n if n else None

    return reduce


def total_present(name: str) -> Reducer:
    """Sum over the prompts that have a value; None when none has (a column only some solvers write)."""

    def reduce(rows: Sequence[Mapping[str, Any]]) -> int | None:
        values = _present(rows, name)
        return int(sum(values)) if values else None

    return reduce


def median(name: str) -> Reducer:
    """Median over the prompts that have a value; None when none has."""

    def reduce(rows: Sequence[Mapping[str, Any]]) -> float | None:
        values = _present(rows, name)
        return float(np.median(values)) if values else None

    return reduce


def minimum(name: str) -> Reducer:
    """Smallest value over the prompts that have one; None when none has."""

    def reduce(rows: Sequence[Mapping[str, Any]]) -> float | None:
        values = _present(rows, name)
        return min(values) if values else None

    return reduce


def mean(name: str) -> Reducer:
    """Mean over the prompts that have a value (bools count as 0/1); None when none has."""

    def reduce(rows: Sequence[Mapping[str, Any]]) -> float | None:
        values = _present(rows, name)
        return sum(values) / len(values) if values else None

    return reduce


def fraction_below(name: str, threshold: float) -> Reducer:
    """Fraction of the prompts with a value whose value is below `threshold`."""

    def reduce(rows: Sequence[Mapping[str, Any]]) -> float | None:
        values = _present(rows, name)
        return sum(v < threshold for v in values) / len(values) if values else None

    return reduce


# Where a row value comes from.
ENGINE = "engine"  # a per-row tensor of the probe engine or its solver, under the column's name
SOLVER = "solver"  # a per-row tensor that only one solver writes (method=exact): absent from other rows
DERIVED = "derived"  # computed by `derive` from the engine's per-row tensors
RUN = "run"  # added by the run: which model, step and settings the row belongs to
TEXT = "text"  # decoded by the tokenizer from the ids
SUMMARY = "summary"  # only in the summary, reduced from other columns

# How a value is written into a row.
KINDS = ("int", "float", "bool", "ids", "floats", "str", "tokens")


@dataclass(frozen=True)
class Column:
    """One column of the result rows and/or the summary."""

    name: str
    kind: str
    doc: str
    source: str = ENGINE
    reduce: Reducer | None = None
    """How a summary cell aggregates this column over its prompts; None: not in the summary."""
    derive: Callable[[Mapping[str, Tensor]], Tensor] | None = None
    """For source=DERIVED: the per-row tensor (R,) from the engine's per-row tensors."""
    report: bool = False
    """Shown in the HTML report's summary table."""
    wandb: bool = False
    """Shown in the W&B table of reconstructions."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"column {self.name}: unknown kind {self.kind!r}")
        if (self.source == DERIVED) != (self.derive is not None):
            raise ValueError(f"column {self.name}: a derived column needs a derive function, and only it")


def _accuracy(correct: str, count: str, doc: str, *, wandb: bool = False) -> Column:
    """A per-row accuracy whose summary is the pooled ratio of its counts."""
    return Column(correct.replace("_correct", "_acc"), "float", doc, reduce=pooled(correct, count), report=True,
                  wandb=wandb)


def _interval(correct: str, count: str) -> tuple[Column, Column]:
    """The summary's 95% interval of a pooled accuracy, over prompts."""
    name = correct.replace("_correct", "_acc")
    return tuple(Column(f"{name}_{end}", "float", f"{end} end of the 95% interval of {name} (bootstrap over prompts)",
                        SUMMARY, reduce=pooled_interval(correct, count, side)) for side, end in enumerate(("lo", "hi")))


def _identifiable(kind: str, count: str, doc: str) -> tuple[Column, Column, Column, Column]:
    """An exact solver's identifiable fraction (pooled in the summary), its 95% interval, and its count."""
    name = f"{kind}_identifiable"
    return (Column(name, "float", doc, SOLVER, reduce=pooled_present(f"{name}_count", count), report=True,
                   wandb=True),
            *(Column(f"{name}_{end}", "float", f"{end} end of the 95% interval of {name} (bootstrap over prompts)",
                     SUMMARY, reduce=pooled_interval(f"{name}_count", count, side))
              for side, end in enumerate(("lo", "hi"))),
            Column(f"{name}_count", "int", f"{kind} positions identifiable (exact rows)", SOLVER,
                   reduce=total_present(f"{name}_count")))


COLUMNS: tuple[Column, ...] = (
    # which row
    Column("step", "int", "training step of the probed weights (updates done)", RUN, wandb=True),
    Column("checkpoint", "str", "checkpoint file name (or the in-memory model's name)", RUN),
    Column("family", "str", "model family", RUN),
    Column("source_id", "str", "identity of the weights: checkpoint content hash, or untrained config and seed", RUN),
    Column("settings_id", "str", "hash of the settings, prompts and schema version shared by a results file", RUN),
    Column("block", "int", "block k whose output is inverted (0: the embedding itself)", wandb=True),
    Column("mask", "int", "m: positions < m are masked out of the loss (non-self)", wandb=True),
    Column("prompt_index", "int", "index of the prompt in the prompt set", wandb=True),
    Column("prompt", "str", "the prompt text as probed (after cutting)", TEXT, wandb=True),
    # what was recovered
    Column("target_ids", "ids", "the prompt's token ids (real positions only)"),
    Column("recovered_ids", "ids", "top-1 decoded token per real position"),
    Column("topk_ids", "ids", "top-k decoded tokens per real position, best first"),
    Column("target_tokens", "tokens", "the prompt's tokens as strings", TEXT),
    Column("recovered_tokens", "tokens", "the decoded tokens as strings", TEXT),
    Column("recovered_text", "str", "the decoded tokens as text", TEXT, wandb=True),
    # metrics
    _accuracy("self_correct", "n_self", "top-1 recovery of visible positions (>= m); None with free=masked, "
              "where they are held at their true embeddings (not measured)", wandb=True),
    _accuracy("nonself_correct", "n_nonself", "top-1 recovery of masked positions (< m); None for m = 0", wandb=True),
    *_interval("self_correct", "n_self"),
    *_interval("nonself_correct", "n_nonself"),
    _accuracy("self_topk_correct", "n_self", "top-k recovery of visible positions"),
    _accuracy("nonself_topk_correct", "n_nonself", "top-k recovery of masked positions"),
    Column("exact", "bool", "every real position recovered (summary: fraction of prompts)", reduce=mean("exact"),
           report=True),
    Column("final_loss", "float", "the distance (settings' loss_fn) at the end of the inversion",
           reduce=mean("final_loss"), report=True),
    Column("distance_ratio", "float", "||hidden(x) - Y||_1 / ||hidden(e + shift) - Y||_1: below 1, the "
           "inversion is as close as a slightly shifted true input", reduce=mean("distance_ratio"), report=True,
           wandb=True),
    Column("ratio_below_1", "float", "fraction of prompts whose distance ratio is below 1 (the source's criterion)",
           SUMMARY, reduce=fraction_below("distance_ratio", 1.0), report=True),
    Column("steps_run", "int", "optimisation steps actually run (fewer with patience; exact: coordinate-search sweeps)", reduce=mean("steps_run")),
    # exact identifiability (method=exact rows only; lmrep.probe.exact): the ceiling under recovery
    *_identifiable("self", "n_self", "fraction of visible positions (>= m) whose true token is identifiable: the "
                   "unique nearest candidate, every wrong one farther than the shifted true input"),
    *_identifiable("nonself", "n_nonself", "fraction of masked positions (< m) whose true token is identifiable "
                   "from the outputs at positions >= m; None for m = 0"),
    Column("identifiable", "ids", "per real position: 1 identifiable, 0 not, -1 not scored (exact rows)", SOLVER),
    Column("true_rank", "ids", "per real position: rank of the true token among the candidates (1: nearest; "
           "-1 not scored)", SOLVER),
    Column("margins", "floats", "per real position: nearest wrong candidate's distance minus the true token's "
           "(None: not scored)", SOLVER),
    Column("median_rank", "float", "median rank of the true token over the scored positions (summary: median "
           "over prompts)", SOLVER, reduce=median("median_rank"), report=True),
    Column("min_margin", "float", "smallest margin over the scored positions (summary: over prompts)",
           SOLVER, reduce=minimum("min_margin"), report=True),
    Column("median_margin", "float", "median margin over the scored positions (summary: median over prompts)",
           SOLVER, reduce=median("median_margin")),
    Column("exhaustive", "bool", "every candidate combination was tried: false where m > 1 masked positions were "
           "found by coordinate search (summary: fraction of prompts)", SOLVER, reduce=mean("exhaustive"),
           report=True),
    # token counts behind the accuracies
    Column("n_real", "int", "real (non-padding) prompt positions", reduce=total("n_real")),
    Column("n_self", "int", "real positions >= m that were measured (0 with free=masked)", reduce=total("n_self")),
    Column("n_nonself", "int", "real positions < m", reduce=total("n_nonself")),
    Column("self_correct", "int", "visible positions recovered (top-1)", reduce=total("self_correct")),
    Column("nonself_correct", "int", "masked positions recovered (top-1)", reduce=total("nonself_correct")),
    Column("self_topk_correct", "int", "visible positions recovered (top-k)", reduce=total("self_topk_correct")),
    Column("nonself_topk_correct", "int", "masked positions recovered (top-k)", reduce=total("nonself_topk_correct")),
)


def columns(*, source: str | None = None) -> list[Column]:
    """The declared columns (of one source, if given), in declaration order."""
    return [c for c in COLUMNS if source is None or c.source == source]


def summary_columns() -> list[Column]:
    """Columns that a summary cell carries."""
    return [c for c in COLUMNS if c.reduce is not None]


def plain_value(value: Tensor, kind: str, n_real: int) -> Any:
    """One row's value of a per-row tensor as a plain JSON value (ids cut to the real length, NaN -> None)."""
    if kind == "ids":
        return value[:n_real].tolist()
    if kind == "floats":
        return [None if math.isnan(v) else v for v in value[:n_real].tolist()]
    if kind == "int":
        return int(value)
    if kind == "bool":
        return bool(value)
    number = float(value)
    return None if math.isnan(number) else number
