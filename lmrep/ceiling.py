"""Gradient descent beside its ceiling: every token of a gradient row classed by the exact row of the same probe.

A gradient row (method embedding/onehot) and an exact row (method=exact,
`lmrep.probe.exact`) of the same weights, context, block, mask and prompt pair
up; each scored position of the gradient row then falls in one class:

- recovered: gradient descent gave the token back, and it is identifiable;
- missed: identifiable, but gradient descent did not recover it (the optimiser failed);
- lost: not identifiable, and not recovered (the representation lost it);
- tie: recovered although exact marks it not identifiable: a wrong candidate is as
  near as the true token, within the shifted-input baseline (reported, never silent).

An exact row without a gradient partner classes its positions as recovered
(identifiable) or lost. Everything here reads result rows only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

EXACT = "exact"
CLASSES = ("recovered", "missed", "lost", "tie")
REGIONS = ("self", "nonself")
CLASS_KEYS = ("step", "block", "mask", "context")


def is_exact(row: dict[str, Any]) -> bool:
    """Whether a row was written by the exact solver."""
    return row.get("method") == EXACT


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row.get("source_id"), row["step"], row["context"], row["block"], row["mask"], row["prompt_index"])


def exact_partners(rows: Iterable[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The exact rows by (source, step, context, block, mask, prompt)."""
    return {_key(r): r for r in rows if is_exact(r)}


def partner(row: dict[str, Any], partners: dict[tuple[Any, ...], dict[str, Any]]) -> dict[str, Any] | None:
    """The exact row of the same probe as a gradient row, if one was made with the same prompt tokens."""
    found = partners.get(_key(row))
    return found if found is not None and found["target_ids"] == row["target_ids"] else None


def token_classes(row: dict[str, Any], exact_row: dict[str, Any] | None = None) -> list[str | None]:
    """One class per real position (None where exact scored nothing); `row` may itself be an exact row."""
    exact_row = row if exact_row is None and is_exact(row) else exact_row
    if exact_row is None:
        raise ValueError("token_classes needs an exact row: pass the exact partner of a gradient row")
    out: list[str | None] = []
    for got, want, ident in zip(row["recovered_ids"], row["target_ids"], exact_row["identifiable"]):
        if ident < 0:
            out.append(None)
        elif row is exact_row:
            out.append("recovered" if ident == 1 else "lost")
        elif got == want:
            out.append("recovered" if ident == 1 else "tie")
        else:
            out.append("missed" if ident == 1 else "lost")
    return out


def classified_rows(rows: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], list[str | None]]]:
    """(row, classes) for every gradient row with an exact partner, and every exact row without a gradient one."""
    partners = exact_partners(rows)
    out, covered = [], set()
    for row in rows:
        if is_exact(row):
            continue
        found = partner(row, partners)
        if found is not None:
            out.append((row, token_classes(row, found)))
            covered.add(_key(found))
    out += [(r, token_classes(r)) for key, r in partners.items() if key not in covered]
    return out


def class_counts(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (step, block, mask, context): how many self and non-self positions fall in each class.

    Columns `<region>_<class>` (e.g. `nonself_missed`) plus `compared`: whether the cell's
    rows are gradient rows set against exact (else exact rows alone: recovered = identifiable).
    """
    cells: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row, classes in classified_rows(rows):
        key = tuple(row[k] for k in CLASS_KEYS)
        cell = cells.setdefault(key, {**dict(zip(CLASS_KEYS, key)), "compared": not is_exact(row),
                                      **{f"{g}_{c}": 0 for g in REGIONS for c in CLASSES}})
        for pos, cls in enumerate(classes):
            if cls is not None:
                cell[f"{'self' if pos >= row['mask'] else 'nonself'}_{cls}"] += 1
    return [cells[k] for k in sorted(cells)]
