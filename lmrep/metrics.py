"""Recovery metrics on plain tensors, the distance ratio, and their aggregation.

Everything here works on hand-made tensors, so each metric can be checked on a
case with a known answer. Shapes: R rows (one per block x mask x prompt), T
prompt positions, k candidates per position.

- self: real positions >= m (their own output is in the loss);
- non-self: real positions < m (their output is masked; only the other
  positions' outputs can carry their identity).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lmrep import schema

DEFAULT_GROUP_KEYS = ("step", "block", "mask", "context")


def _regions(real_mask: Tensor, mask_m: Tensor) -> tuple[Tensor, Tensor]:
    """Boolean (R, T) self region (real, >= m) and non-self region (real, < m)."""
    t = real_mask.shape[1]
    positions = torch.arange(t, device=real_mask.device)  # (T,)
    visible = positions[None, :] >= mask_m[:, None]  # (R, T)
    return real_mask & visible, real_mask & ~visible


def _fraction(correct: Tensor, total: Tensor) -> Tensor:
    """correct / total as float, NaN where total is 0."""
    total_f = total.to(torch.float64)
    return torch.where(total > 0, correct.to(torch.float64) / total_f.clamp_min(1), math.nan)


def _split_counts(hit: Tensor, real_mask: Tensor, mask_m: Tensor, prefix: str) -> dict[str, Tensor]:
    """Counts and accuracies of a boolean (R, T) `hit` over the self and non-self regions."""
    self_region, nonself_region = _regions(real_mask, mask_m)
    n_self = self_region.sum(1)
    n_nonself = nonself_region.sum(1)
    self_correct = (hit & self_region).sum(1)
    nonself_correct = (hit & nonself_region).sum(1)
    return {
        f"self_{prefix}acc": _fraction(self_correct, n_self),
        f"nonself_{prefix}acc": _fraction(nonself_correct, n_nonself),
        f"self_{prefix}correct": self_correct,
        f"nonself_{prefix}correct": nonself_correct,
        "n_self": n_self,
        "n_nonself": n_nonself,
    }


def recovery(pred_ids: Tensor, target_ids: Tensor, real_mask: Tensor, mask_m: Tensor) -> dict[str, Tensor]:
    """Top-1 recovery per row: self_acc, nonself_acc (NaN when a row has no masked real position), exact, counts."""
    if pred_ids.shape != target_ids.shape or real_mask.shape != target_ids.shape:
        raise ValueError(f"shape mismatch: pred {tuple(pred_ids.shape)}, target {tuple(target_ids.shape)}, real {tuple(real_mask.shape)}")
    real_mask = real_mask.bool()
    hit = pred_ids == target_ids  # (R, T)
    out = _split_counts(hit, real_mask, mask_m, prefix="")
    out["exact"] = (hit | ~real_mask).all(1)
    out["n_real"] = real_mask.sum(1)
    return out


def topk_recovery(topk_ids: Tensor, target_ids: Tensor, real_mask: Tensor, mask_m: Tensor) -> dict[str, Tensor]:
    """Top-k recovery per row: the target is among a position's k candidates (R, T, k)."""
    if topk_ids.shape[:2] != target_ids.shape:
        raise ValueError(f"shape mismatch: top-k {tuple(topk_ids.shape)}, target {tuple(target_ids.shape)}")
    hit = (topk_ids == target_ids[..., None]).any(-1)  # (R, T)
    out = _split_counts(hit, real_mask.bool(), mask_m, prefix="topk_")
    return {k: v for k, v in out.items() if not k.startswith("n_")}


def region_from_mask(mask_m: Tensor, t: int) -> Tensor:
    """Boolean (R, t) loss region: positions >= each row's mask m."""
    positions = torch.arange(t, device=mask_m.device)
    return positions[None, :] >= mask_m[:, None]


def distance_ratio(generated: Tensor, shifted: Tensor, target: Tensor, region: Tensor) -> Tensor:
    """Per row ||generated - target||_1 / ||shifted - target||_1 over the (R, T) loss region; < 1 is success.

    `generated` is the block output for the recovered input, `shifted` for the true
    input plus a small shift (the source's baseline), `target` for the true input,
    all (R, T, d).
    """
    weight = region[..., None].to(target.dtype)  # (R, T, 1)
    num = ((generated - target).abs() * weight).sum((1, 2))
    den = ((shifted - target).abs() * weight).sum((1, 2))
    return num / den


def summarize(rows: Iterable[Mapping[str, Any]], keys: Sequence[str] = DEFAULT_GROUP_KEYS) -> list[dict[str, Any]]:
    """Aggregate per-prompt rows into one row per `keys` group (default step, block, mask, context).

    Every summary column of the result schema (`lmrep.schema`) is reduced as it
    declares: token accuracies are exact pooled ratios (sum of correct / sum of
    tokens, not a mean of per-prompt fractions); `exact` is the fraction of
    prompts recovered whole; loss and distance ratio are means over prompts;
    `ratio_below_1` is the fraction of prompts meeting the source's criterion.
    A key missing from a row groups as None; a column missing from a row is left
    out of its reduction.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    out = []
    for group_key, members in groups.items():
        summary: dict[str, Any] = dict(zip(keys, group_key))
        summary["n_prompts"] = len(members)
        for column in schema.summary_columns():
            summary[column.name] = column.reduce(members)  # type: ignore[misc]
        out.append(summary)
    return sorted(out, key=lambda s: tuple((v is None, v if v is not None else 0) for v in (s[k] for k in keys)))
