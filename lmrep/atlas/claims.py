"""Judging the source's claims from atlas cells, by the rule written next to each claim in the preset.

A rule is one of:

- threshold: `{where: {...}, metric: nonself_acc, reduce: min, op: ">=", value: 0.9}`:
  the cells matching `where`, their metric reduced (min / max / mean), compared;
- compare: `{compare: {a: {...}, b: {...}}, metric: ..., reduce: mean, op: "<=", value: -0.2}`:
  reduce(a) - reduce(b) compared with value (e.g. expanded at most flat - 0.2);
- all: `{all: [rule, rule, ...]}`: every part must hold.

`where` matches atlas.csv columns: a value (equality), a list (any of), a string
with a comparison (">=32"), or 'last' for block (the model's last block) and step
(the run's final step). A rule is judged under each protocol on its own (the
protocol is added to every `where`): "holds" / "fails" when every protocol that
has the cells agrees, "depends on protocol" when they differ, "not tested at this
scale" when no protocol has the cells. Cells whose metric is empty (e.g. self
under free=masked) do not count.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

HOLDS, FAILS, DEPENDS, UNTESTED = "holds", "fails", "depends on protocol", "not tested at this scale"
VERDICTS = (HOLDS, FAILS, DEPENDS, UNTESTED)
OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, ">": operator.gt, "<=": operator.le,
                                                  "<": operator.lt}
REDUCERS: dict[str, Callable[[list[float]], float]] = {"min": min, "max": max,
                                                       "mean": lambda v: sum(v) / len(v)}
SHOWN_CELLS = 4  # cells listed per selection in the deciding evidence


@dataclass
class Judgement:
    """One rule under one protocol: True / False / None (no cells), and the cells and values behind it."""

    result: bool | None
    evidence: list[str] = field(default_factory=list)


@dataclass
class Verdict:
    """A claim's verdict, with each protocol's judgement."""

    claim_id: int
    text: str
    verdict: str
    by_protocol: dict[str, Judgement]


def matches(cell: dict[str, Any], where: dict[str, Any]) -> bool:
    """Whether a cell satisfies every condition of `where`."""
    for key, want in where.items():
        have = cell.get(key)
        if want == "last" and key in ("block", "step"):
            want = cell.get("n_blocks") if key == "block" else cell.get("final_step")
        if isinstance(want, list):
            if have not in want:
                return False
        elif isinstance(want, str) and want[:1] in "<>":
            op = want[:2] if want[:2] in OPS else want[:1]
            if have is None or not OPS[op](float(have), float(want[len(op):])):
                return False
        elif have != want:
            return False
    return True


def describe(cell: dict[str, Any], metric: str) -> str:
    """A cell in a few words, with its value and interval: 'flat d=512 seed 0 step 0 block 1 m=1: 0.97 [0.91, 1.00]'."""
    lo, hi = cell.get(f"{metric}_lo"), cell.get(f"{metric}_hi")
    spread = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else ""
    return (f"{cell.get('arch')} d={cell.get('d_model')} n={cell.get('n_blocks')} seed {cell.get('seed')} "
            f"step {cell.get('step')} block {cell.get('block')} m={cell.get('mask')}: {metric} "
            f"{cell[metric]:.2f}{spread}")


def _select(cells: Sequence[dict[str, Any]], where: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    return [c for c in cells if matches(c, where) and c.get(metric) is not None]


def judge(rule: dict[str, Any], cells: Sequence[dict[str, Any]], protocol: str) -> Judgement:
    """A rule under one protocol."""
    if "all" in rule:
        parts = [judge(part, cells, protocol) for part in rule["all"]]
        evidence = [line for part in parts for line in part.evidence]
        if any(p.result is False for p in parts):
            return Judgement(False, evidence)
        if any(p.result is None for p in parts):
            return Judgement(None, evidence)
        return Judgement(True, evidence)
    metric, op, value = rule["metric"], rule.get("op", ">="), float(rule["value"])
    if op not in OPS:
        raise ValueError(f"unknown rule op {op!r}: choose one of {', '.join(OPS)}")
    reduce = REDUCERS[rule.get("reduce", "mean")]
    if "compare" in rule:
        sides = {}
        for side in ("a", "b"):
            chosen = _select(cells, {**rule["compare"][side], "protocol": protocol}, metric)
            if not chosen:
                return Judgement(None, [f"{protocol}: no cells for side {side} ({rule['compare'][side]})"])
            sides[side] = (reduce([c[metric] for c in chosen]), chosen)
        diff = sides["a"][0] - sides["b"][0]
        evidence = [f"{protocol}: {rule.get('reduce', 'mean')} {metric} a = {sides['a'][0]:.2f} "
                    f"({len(sides['a'][1])} cells), b = {sides['b'][0]:.2f} ({len(sides['b'][1])} cells); "
                    f"a - b = {diff:+.3f}, needs {op} {value:+.2f}"]
        evidence += [f"  {s}: {describe(c, metric)}" for s in "ab" for c in sides[s][1][:SHOWN_CELLS]]
        return Judgement(OPS[op](diff, value), evidence)
    chosen = _select(cells, {**rule["where"], "protocol": protocol}, metric)
    if not chosen:
        return Judgement(None, [f"{protocol}: no cells ({rule['where']})"])
    got = reduce([c[metric] for c in chosen])
    evidence = [f"{protocol}: {rule.get('reduce', 'mean')} {metric} over {len(chosen)} cells = {got:.3f}, "
                f"needs {op} {value:.2f}"]
    # The cells that decide: the lowest for a min, the highest for a max, else those nearest the threshold.
    order = {"min": lambda c: c[metric], "max": lambda c: -c[metric]}.get(rule.get("reduce", "mean"),
                                                                         lambda c: abs(c[metric] - value))
    nearest = sorted(chosen, key=order)[:SHOWN_CELLS]
    evidence += [f"  {describe(c, metric)}" for c in nearest]
    return Judgement(OPS[op](got, value), evidence)


def verdict_of(results: dict[str, bool | None]) -> str:
    """holds / fails / depends on protocol / not tested at this scale, from each protocol's result."""
    tested = [r for r in results.values() if r is not None]
    if not tested:
        return UNTESTED
    if all(tested):
        return HOLDS
    if not any(tested):
        return FAILS
    return DEPENDS


def judge_claims(claims: Sequence[Any], cells: Sequence[dict[str, Any]], protocols: Sequence[str]) -> list[Verdict]:
    """Every claim's verdict under the protocols it names (default: all of `protocols`)."""
    out = []
    for claim in claims:
        names = claim.protocols or list(protocols)
        by_protocol = {p: judge(claim.rule, cells, p) for p in names}
        out.append(Verdict(claim.id, claim.text, verdict_of({p: j.result for p, j in by_protocol.items()}),
                           by_protocol))
    return out


def explain(verdict: Verdict, protocols: Sequence[Any]) -> str:
    """Where lmrep and the source may disagree: which protocols hold and fail, and how they differ from the source's."""
    holds = [p for p, j in verdict.by_protocol.items() if j.result is True]
    fails = [p for p, j in verdict.by_protocol.items() if j.result is False]
    if verdict.verdict == UNTESTED:
        lines = [line for j in verdict.by_protocol.values() for line in j.evidence if not line.startswith("  ")]
        if all("no cells" in line for line in lines):
            return "no cells at this scale"
        missing = [line for line in dict.fromkeys(lines) if "no cells" in line]
        return ("partly measured (the parts with cells are below, with the cells behind them); the verdict needs "
                "cells this preset does not have: " + "; ".join(missing))
    source = next((p for p in protocols if p.source), None)
    by_name = {p.name: p for p in protocols}
    text = f"holds under {', '.join(holds) or 'none'}; fails under {', '.join(fails) or 'none'}"
    if source is None or source.name not in verdict.by_protocol or verdict.by_protocol[source.name].result is None:
        return text
    at_source = verdict.by_protocol[source.name].result
    other = fails if at_source else holds
    if not other:
        return text + f" (the source's protocol, {source.name}, agrees with every other)"
    diffs = []
    for name in other:
        changed = [f"{f} {getattr(source, f)} -> {getattr(by_name[name], f)}" for f in ("context", "free", "method")
                   if getattr(source, f) != getattr(by_name[name], f)]
        diffs.append(f"{name} ({', '.join(changed)})")
    return (text + f". Under the source's own protocol ({source.name}) it {'holds' if at_source else 'fails'}; "
            f"the protocol difference that turns it: {'; '.join(diffs)}")
