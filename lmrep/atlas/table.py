"""atlas.csv: every measured cell of every stage in one tidy table, with its spread over prompts.

A cell is one (stage, protocol, model, seed, checkpoint step, block, mask); its
values are the result schema's summary columns (pooled recovery with a 95%
bootstrap interval over prompts, exact-match fraction, distance ratio, ...),
plus the same recovery on the source's own prompt (prompt 0) alone.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data.files import write_text_atomic
from lmrep import schema
from lmrep.atlas.stages import ProbedDir
from lmrep.metrics import summarize
from lmrep.runs import read_results

SOURCE_PROMPT_INDEX = 0  # the preset puts the source's prompt first

# The columns that say which cell a row is, with what each means.
KEY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("stage", "untrained (a sweep, probe only) or trained probes (a family's checkpoints)"),
    ("protocol", "the probe protocol's name (see the report's protocol table)"),
    ("context", "prompt or padded"),
    ("free", "which positions were optimised: all, real (padding held) or masked (visible positions held)"),
    ("method", "the probe method (embedding, onehot, exact, ...)"),
    ("run", "sweep or trained family name, e.g. flat-n8 or llama-d256"),
    ("family", "model family: mixer or llama"),
    ("arch", "token mixing: flat, expanded, parallel, or llama"),
    ("d_model", "width"),
    ("n_blocks", "depth"),
    ("expansion", "expansion factor of an expanded mixer (empty otherwise)"),
    ("n_parallel", "mixings summed by a parallel mixer (empty otherwise)"),
    ("seed", "initialisation seed"),
    ("trained", "True for checkpoints of a training run (step 0 included)"),
    ("step", "training step of the probed weights"),
    ("final_step", "the last probed step of this run (trained: the end of training)"),
    ("block", "block k whose output is inverted"),
    ("mask", "m: positions < m left out of the loss (non-self)"),
)
SOURCE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("source_self_acc", "self recovery on the source's prompt alone"),
    ("source_nonself_acc", "non-self recovery on the source's prompt alone"),
    ("source_recovered", "the source's prompt as recovered (top-1)"),
)
MODEL_KEYS = [name for name, _ in KEY_COLUMNS[5:14]]


def atlas_fields() -> list[str]:
    """atlas.csv's columns in order: the cell keys, n_prompts, the schema's summary columns, the source prompt's."""
    return [*(n for n, _ in KEY_COLUMNS), "n_prompts", *(c.name for c in schema.summary_columns()),
            *(n for n, _ in SOURCE_COLUMNS)]


def collect_rows(dirs: Sequence[ProbedDir]) -> list[dict[str, Any]]:
    """Every result row of the stages' folders, with its stage, protocol and model facts."""
    rows = []
    for d in dirs:
        for row in read_results(d.path):
            facts = d.meta.get(row["source_id"])
            if facts is None:
                continue  # a model no longer in the preset
            rows.append({**row, **facts, "stage": d.stage, "protocol": d.protocol})
    return rows


def cell_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One cell per (stage, protocol, model, seed, step, block, mask) of the rows, sorted."""
    keys = [n for n, _ in KEY_COLUMNS if n != "final_step"]
    cells = summarize(rows, keys=keys)
    final = {}
    for row in rows:
        run = (row["stage"], row["protocol"], row["run"], row["seed"])
        final[run] = max(final.get(run, 0), row["step"])
    source = {tuple(r.get(k) for k in keys): r for r in rows if r["prompt_index"] == SOURCE_PROMPT_INDEX}
    for cell in cells:
        cell["final_step"] = final[(cell["stage"], cell["protocol"], cell["run"], cell["seed"])]
        row = source.get(tuple(cell[k] for k in keys))
        if row is not None:
            cell.update(source_self_acc=row.get("self_acc"), source_nonself_acc=row.get("nonself_acc"),
                        source_recovered=row.get("recovered_text"))
    return cells


def pooled_cells(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Cells pooled over everything not in `keys` (e.g. over seeds as well as prompts), with their intervals."""
    return summarize(rows, keys=list(keys))


def write_atlas_csv(cells: Sequence[dict[str, Any]], path: Path) -> Path:
    """atlas.csv (and atlas_columns.json, what each column means)."""
    fields = atlas_fields()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for cell in cells:
        writer.writerow({k: "" if cell.get(k) is None else cell[k] for k in fields})
    write_text_atomic(path, buffer.getvalue())
    docs = {**dict(KEY_COLUMNS), "n_prompts": "prompts behind the cell",
            **{c.name: c.doc for c in schema.summary_columns()}, **dict(SOURCE_COLUMNS)}
    write_text_atomic(path.with_name("atlas_columns.json"), json.dumps(docs, indent=1))
    return path


def read_atlas_csv(path: Path) -> list[dict[str, Any]]:
    """atlas.csv back as cells with numbers as numbers (empty -> None)."""
    cells = []
    for raw in csv.DictReader(path.open(encoding="utf-8")):
        cells.append({k: _number(v) for k, v in raw.items()})
    return cells


def _number(text: str) -> Any:
    """A CSV field as int, float, bool or str (empty -> None)."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
