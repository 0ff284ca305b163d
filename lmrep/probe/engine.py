"""The inversion engine: how much of its input does each block represent?

For a model behind the probing surface (`models.surface.ProbeSurface`), prompts
`a`, blocks k and masks m, the engine finds an input x whose block-k output
matches the true one, `Y = hidden(E[a], k)`, on positions >= m only, then
decodes x back to tokens. Tokens at positions >= m are "self" (their own
output is in the loss); tokens at positions < m are "non-self" (only the other
positions' outputs can carry them).

Every (block, mask, prompt) row is laid out at once (`rows.RowLayout`), cut into
chunks, and each chunk is answered by a solver (`solver.Solver`; the gradient
solver by default). The engine then scores the answers the same way for every
solver (`lmrep.metrics`) into a `ProbeResult` whose columns the result schema
(`lmrep.schema`) declares. The engine touches nothing but the surface.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lmrep import metrics, schema
from lmrep.probe.exact import ExactSolver
from lmrep.probe.gradient import GradientSolver
from lmrep.probe.results import ProbeResult
from lmrep.probe.rows import RowLayout
from lmrep.probe.settings import EXACT, ProbeSettings
from lmrep.probe.solver import Answers, Solver
from models.surface import ProbeSurface, check_block_range, check_length

DEFAULT_CALIBRATION_GRID = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


class frozen:
    """Context manager: model in eval mode with parameters frozen; both restored on exit."""

    def __init__(self, model: ProbeSurface) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.flags = [p.requires_grad for p in self.model.parameters()]
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for p, flag in zip(self.model.parameters(), self.flags):
            p.requires_grad_(flag)
        self.model.train(self.was_training)


def _check_request(model: ProbeSurface, prompt_ids: Tensor, blocks: Sequence[int], masks: Sequence[int],
                   prompt_indices: Sequence[int] | None, prompt_lengths: Tensor | None,
                   allowed_tokens: Sequence[int] | None) -> tuple[list[int], Tensor]:
    """Clear errors for a request the model cannot answer; returns (prompt indices, prompt lengths)."""
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] == 0 or prompt_ids.shape[1] == 0:
        raise ValueError(f"empty prompt set: expected prompt ids of shape (B >= 1, T >= 1), got {tuple(prompt_ids.shape)}")
    n_prompts, t_prompt = prompt_ids.shape
    check_length(t_prompt, model.context_length)
    if len(blocks) == 0 or len(masks) == 0:
        raise ValueError("no blocks or no masks to probe: give at least one of each")
    for k in blocks:
        check_block_range(int(k), model.n_blocks)
    for m in masks:
        if not 0 <= int(m) < t_prompt:
            raise ValueError(f"mask {m} is out of range: masks must be in 0..{t_prompt - 1} for {t_prompt}-token prompts")
    indices = list(range(n_prompts)) if prompt_indices is None else list(prompt_indices)
    if len(indices) != n_prompts:
        raise ValueError(f"{len(indices)} prompt indices for {n_prompts} prompts")
    device = model.embedding_matrix.device
    if prompt_lengths is None:
        prompt_lengths = torch.full((n_prompts,), t_prompt, dtype=torch.long)
    lengths = prompt_lengths.to(device=device, dtype=torch.long)
    if lengths.shape != (n_prompts,) or bool((lengths < 1).any() | (lengths > t_prompt).any()):
        raise ValueError(f"prompt_lengths must be (B,) = ({n_prompts},) with values in 1..{t_prompt}")
    vocab = model.embedding_matrix.shape[0]
    if allowed_tokens is not None and not all(0 <= t < vocab for t in allowed_tokens):
        raise ValueError(f"allowed_tokens must be token ids in 0..{vocab - 1}")
    return indices, lengths


def probe(
    model: ProbeSurface,
    prompt_ids: Tensor,
    *,
    blocks: Sequence[int],
    masks: Sequence[int],
    settings: ProbeSettings,
    pad_token_id: int,
    prompt_lengths: Tensor | None = None,
    prompt_indices: Sequence[int] | None = None,
    pinv: Tensor | None = None,
    solver: Solver | None = None,
    on_chunk: Callable[[int], Any] | None = None,
) -> ProbeResult:
    """Invert every block in `blocks` under every mask in `masks` for every prompt (B, T), all at once.

    prompt_lengths (B,) gives real lengths of right-padded prompts (default: all T);
    prompt_indices (B,) names the prompts (default 0..B-1) and seeds their start
    noise; pinv is a precomputed pinv(W_E) (d, V); solver answers the rows
    (default: the exact solver for method=exact, else the gradient solver); on_chunk(n) is called after each chunk of n rows.
    """
    indices, lengths = _check_request(model, prompt_ids, blocks, masks, prompt_indices, prompt_lengths,
                                      settings.allowed_tokens)
    n_prompts, t_prompt = prompt_ids.shape
    w_e = model.embedding_matrix.detach()  # (V, d)
    device = w_e.device
    settings = settings.resolved(model, float(w_e.std()))
    if pinv is None:
        pinv = torch.linalg.pinv(w_e)  # (d, V): once per probe call, never per step
    if solver is None:
        solver = ExactSolver(pad_token_id) if settings.method == EXACT else GradientSolver()
    t_ctx = model.context_length if settings.context == "padded" else t_prompt

    positions = torch.arange(t_ctx, device=device)
    real = positions[None, :] < lengths[:, None]  # (B, Tc): real prompt positions
    ids = torch.full((n_prompts, t_ctx), pad_token_id, dtype=torch.long, device=device)
    ids[:, :t_prompt] = prompt_ids.to(device)
    ids = torch.where(real, ids, pad_token_id)

    with frozen(model):
        layout = RowLayout.build(model, ids, real, blocks=blocks, masks=masks, prompt_indices=indices,
                                 settings=settings, pinv=pinv, t_prompt=t_prompt)
        answers = []
        for chunk in layout.chunks(settings):
            answers.append(solver.solve(model, chunk, settings))
            if on_chunk is not None:
                on_chunk(chunk.n_rows)
    return _score(layout, answers, indices, settings)


def _score(layout: RowLayout, answers: list[Answers], prompt_indices: list[int],
           settings: ProbeSettings) -> ProbeResult:
    """Recovery metrics of every row from the solvers' answers, as a ProbeResult."""
    topk = torch.cat([a.topk_ids for a in answers]).cpu()
    row_p = layout.row_p
    target_ids = layout.ids[:, :layout.t_prompt].cpu()[row_p]
    real_rows = layout.real[:, :layout.t_prompt].cpu()[row_p]
    row_mask = layout.row_mask
    values: dict[str, Tensor] = {
        "block": layout.row_block, "mask": row_mask, "prompt_index": torch.tensor(prompt_indices)[row_p],
        "target_ids": target_ids, "recovered_ids": topk[..., 0], "topk_ids": topk,
        "final_loss": torch.cat([a.final_loss for a in answers]).cpu(),
        "distance_ratio": torch.cat([a.distance_ratio for a in answers]).cpu(),
        "steps_run": torch.cat([a.steps_run for a in answers]).cpu(),
    }
    values.update(metrics.recovery(topk[..., 0], target_ids, real_rows, row_mask))
    values.update(metrics.topk_recovery(topk, target_ids, real_rows, row_mask))
    for name in answers[0].extra:
        values[name] = torch.cat([a.extra[name] for a in answers]).cpu()
    if settings.free == "masked":  # visible positions were held at their true embeddings: nothing measured there
        for name in ("n_self", "self_correct", "self_topk_correct"):
            values[name] = torch.zeros_like(values[name])
        for name in ("self_acc", "self_topk_acc"):
            values[name] = torch.full_like(values[name], math.nan)
    for column in schema.columns(source=schema.DERIVED):
        values[column.name] = column.derive(values)  # type: ignore[misc]
    return ProbeResult(values=values, real_mask=real_rows, settings=settings)


def calibrate_lr(
    model: ProbeSurface,
    prompt_ids: Tensor,
    *,
    grid: Sequence[float] = DEFAULT_CALIBRATION_GRID,
    settings: ProbeSettings,
    pad_token_id: int,
    prompt_lengths: Tensor | None = None,
) -> tuple[float, dict[float, float]]:
    """Pick the lr in `grid` with the best block-1 self (m = 0) top-1 recovery, ties to the lower final loss.

    Returns (best lr, {lr: pooled self accuracy}); for a model family with no measured `probe_lr` entry.
    """
    if len(grid) == 0:
        raise ValueError("empty lr grid")
    block = min(1, model.n_blocks)
    scores: dict[float, float] = {}
    best: tuple[float, float, float] | None = None  # (-acc, loss, lr)
    for lr in grid:
        try:
            result = probe(model, prompt_ids, blocks=[block], masks=[0], pad_token_id=pad_token_id,
                           prompt_lengths=prompt_lengths, settings=dataclasses.replace(settings, lr=float(lr)))
        except FloatingPointError:  # an lr that diverges scores nothing
            scores[float(lr)] = 0.0
            continue
        acc = float(result.self_correct.sum()) / max(int(result.n_self.sum()), 1)
        loss = float(result.final_loss.mean())
        scores[float(lr)] = acc
        candidate = (-acc, loss if math.isfinite(loss) else math.inf, float(lr))
        if best is None or candidate < best:
            best = candidate
    assert best is not None
    return best[2], scores
