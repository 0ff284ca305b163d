"""Recovery metrics and their aggregation on hand-made cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from lmrep.metrics import distance_ratio, recovery, region_from_mask, summarize, topk_recovery

TARGET = torch.tensor([[5, 6, 7, 8, 9, 1]])  # one row, T = 6; position 5 is padding


def test_self_and_nonself_split_at_the_mask() -> None:
    pred = torch.tensor([[5, 0, 7, 0, 9, 1]])  # right at 0, 2, 4; wrong at 1, 3
    real = torch.tensor([[True] * 5 + [False]])
    out = recovery(pred, TARGET, real, torch.tensor([2]))
    # non-self = positions 0, 1 -> 1 of 2; self = positions 2, 3, 4 -> 2 of 3
    assert out["nonself_acc"].item() == pytest.approx(0.5)
    assert out["self_acc"].item() == pytest.approx(2 / 3)
    assert (out["n_nonself"].item(), out["nonself_correct"].item()) == (2, 1)
    assert (out["n_self"].item(), out["self_correct"].item()) == (3, 2)
    assert not out["exact"].item()


def test_mask_zero_has_no_nonself_tokens() -> None:
    real = torch.ones(1, 6, dtype=torch.bool)
    out = recovery(TARGET.clone(), TARGET, real, torch.tensor([0]))
    assert math.isnan(out["nonself_acc"].item())
    assert out["n_nonself"].item() == 0
    assert out["self_acc"].item() == 1.0


def test_padding_is_excluded_from_every_count() -> None:
    pred = torch.tensor([[5, 6, 7, 8, 9, 4]])  # only the padding position is wrong
    real = torch.tensor([[True] * 5 + [False]])
    out = recovery(pred, TARGET, real, torch.tensor([1]))
    assert out["self_acc"].item() == 1.0 and out["nonself_acc"].item() == 1.0
    assert out["n_self"].item() + out["n_nonself"].item() == out["n_real"].item() == 5
    assert out["exact"].item()  # exact ignores padding


def test_a_mask_past_the_real_length_leaves_no_self_tokens() -> None:
    real = torch.tensor([[True, True, False, False, False, False]])
    out = recovery(TARGET.clone(), TARGET, real, torch.tensor([3]))
    assert math.isnan(out["self_acc"].item())
    assert out["nonself_acc"].item() == 1.0


def test_exact_is_per_row() -> None:
    target = torch.tensor([[1, 2, 3], [1, 2, 3]])
    pred = torch.tensor([[1, 2, 3], [1, 0, 3]])
    real = torch.ones(2, 3, dtype=torch.bool)
    out = recovery(pred, target, real, torch.tensor([0, 0]))
    assert out["exact"].tolist() == [True, False]
    assert out["self_acc"].tolist() == pytest.approx([1.0, 2 / 3])


def test_topk_counts_a_hit_anywhere_in_the_candidates() -> None:
    target = torch.tensor([[1, 2, 3, 4]])
    topk = torch.tensor([[[1, 9], [9, 2], [9, 9], [4, 9]]])  # hits at 0 (top-1), 1 (top-2), 3
    real = torch.ones(1, 4, dtype=torch.bool)
    out = topk_recovery(topk, target, real, torch.tensor([2]))
    assert out["nonself_topk_acc"].item() == 1.0  # positions 0, 1
    assert out["self_topk_acc"].item() == 0.5  # positions 2, 3
    top1 = recovery(topk[..., 0], target, real, torch.tensor([2]))
    assert top1["nonself_acc"].item() == 0.5


def test_shape_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        recovery(torch.zeros(1, 3, dtype=torch.long), TARGET, torch.ones(1, 6, dtype=torch.bool), torch.tensor([0]))


def test_distance_ratio_uses_only_the_loss_region() -> None:
    target = torch.zeros(1, 3, 2)
    generated = torch.tensor([[[100.0, 100.0], [1.0, 0.0], [0.0, 1.0]]])  # far off only at masked position 0
    shifted = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]]])
    region = region_from_mask(torch.tensor([1]), 3)
    assert region.tolist() == [[False, True, True]]
    assert distance_ratio(generated, shifted, target, region).item() == pytest.approx(0.5)


def _row(block: int, mask: int, self_correct: int, n_self: int, *, exact: bool, loss: float,
         ratio: float | None, step: int = 0) -> dict:
    return {
        "step": step, "block": block, "mask": mask, "context": "prompt",
        "self_correct": self_correct, "n_self": n_self, "self_topk_correct": n_self,
        "nonself_correct": 0, "n_nonself": mask, "nonself_topk_correct": 0,
        "exact": exact, "final_loss": loss, "distance_ratio": ratio,
    }


def test_summarize_pools_counts_instead_of_averaging_fractions() -> None:
    rows = [
        _row(1, 0, 1, 1, exact=True, loss=0.1, ratio=0.5),  # 1/1
        _row(1, 0, 1, 9, exact=False, loss=0.3, ratio=2.0),  # 1/9
        _row(2, 0, 4, 4, exact=True, loss=0.2, ratio=None),
    ]
    out = {(s["block"], s["mask"]): s for s in summarize(rows)}
    assert set(out) == {(1, 0), (2, 0)}
    group = out[(1, 0)]
    assert group["n_prompts"] == 2
    assert (group["self_correct"], group["n_self"]) == (2, 10)
    assert group["self_acc"] == pytest.approx(0.2)  # not (1 + 1/9) / 2
    assert group["self_topk_acc"] == 1.0
    assert group["nonself_acc"] is None  # m = 0: no masked tokens at all
    assert group["exact"] == 0.5
    assert group["final_loss"] == pytest.approx(0.2)
    assert group["distance_ratio"] == pytest.approx(1.25)
    assert group["ratio_below_1"] == 0.5
    assert out[(2, 0)]["distance_ratio"] is None and out[(2, 0)]["ratio_below_1"] is None


def test_summarize_groups_by_step_and_sorts() -> None:
    rows = [_row(1, 0, 1, 1, exact=True, loss=0.0, ratio=0.1, step=s) for s in (100, 0, 100)]
    out = summarize(rows)
    assert [(s["step"], s["n_prompts"]) for s in out] == [(0, 1), (100, 2)]
