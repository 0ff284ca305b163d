"""The gradient solver: invert a chunk of rows by Adam or plain gradient descent.

The total loss is the sum of per-row losses, so each row gets exactly the
gradient it would get alone. The optimiser is written out on the row tensors so
that its state can follow the rows: with `patience`, a row whose top-1 decode has
settled is retired (its x is its answer) and every per-row tensor is compacted to
the rows still active, so the cost follows the unconverged rows. Compaction keeps
the order, so the rows needing block j stay a prefix. Only check steps (every
CHECK_EVERY) sync with the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lmrep.probe.inputs import INPUTS, topk_ids
from lmrep.probe.rows import Chunk, alive_counts, forward_pieces, row_losses
from lmrep.probe.settings import LR_FINAL_FRACTION, ProbeSettings
from lmrep.probe.solver import Answers
from models.surface import ProbeSurface

CHECK_EVERY = 10  # steps between the (host-syncing) NaN and patience checks
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which the engine used before its Adam was by hand
ADAM_EPS = 1e-8


def row_weights(region: Tensor, d: int, settings: ProbeSettings) -> Tensor:
    """What each row's mean loss is multiplied by in the summed objective.

    Adam is invariant to a row's loss scale, so it takes the plain sum of means.
    GD follows the source, which descends the distance itself (||.||_1 is a sum):
    scaling the mean by the region's element count makes its lr independent of
    T, m and d. Either way the weight is a per-row constant, so batching rows
    changes nothing.
    """
    if settings.optimizer == "adam":
        return torch.ones(region.shape[0], dtype=torch.float32, device=region.device)
    return region.sum(1).to(torch.float32) * d


def raise_if_bad(first_bad: Tensor, blocks: Sequence[int], masks: Sequence[int]) -> None:
    """Raise FloatingPointError naming the first non-finite step, block and mask (of rows in this order)."""
    bad = first_bad >= 0
    if bool(bad.any()):
        r = int(torch.nonzero(bad)[first_bad[bad].argmin()])
        raise FloatingPointError(
            f"non-finite probe loss at step {int(first_bad[r])}, block {blocks[r]}, mask {masks[r]}"
        )


class GradientSolver:
    """Gradient-descent inversion (methods embedding and onehot), the source's procedure batched."""

    def solve(self, model: ProbeSurface, chunk: Chunk, settings: ProbeSettings) -> Answers:
        """Optimise every row of the chunk from its start noise, then decode and score the answers."""
        param = INPUTS[settings.method]
        adam = settings.optimizer == "adam"
        hold = settings.free != "all"  # else every position is free: no per-step where
        w_e, t_prompt = chunk.w_e, chunk.t_prompt
        n_rows = chunk.n_rows
        lr = float(settings.lr)  # type: ignore[arg-type]
        decay = (1 - LR_FINAL_FRACTION) / max(settings.steps - 1, 1)
        beta1, beta2 = ADAM_BETAS
        allowed = None if settings.allowed_tokens is None else torch.tensor(settings.allowed_tokens, device=w_e.device)

        def assemble(x: Tensor, free: Tensor | None, true_embed: Tensor | None) -> Tensor:
            e = param.to_embedding(x, w_e)
            return torch.where(free, e, true_embed) if hold else e  # held positions stay true

        def check_ids(x: Tensor) -> Tensor:
            # Argmax over the allowed columns only: check ids need not be mapped back to vocabulary ids.
            xt = x[:, :t_prompt]
            return param.scores(xt, xt, chunk.pinv, allowed).argmax(-1)

        # Per-row state of the active rows (all of them at first), compacted together as rows retire.
        weight = chunk.region.to(chunk.target.dtype)  # (R, Tc)
        state: dict[str, Tensor] = {
            "index": torch.arange(n_rows, device=chunk.init.device),  # chunk row of each active row
            "target": chunk.target, "weight": weight, "n_pos": weight.sum(1).clamp_min(1),
            "row_weight": row_weights(chunk.region, w_e.shape[1], settings), "watch": chunk.watch,
            "first_bad": torch.full((n_rows,), -1, dtype=torch.long, device=chunk.init.device),
        }
        if hold:
            state.update(free=chunk.free, true_embed=chunk.true_embed)
        if adam:
            state.update(exp_avg=torch.zeros_like(chunk.init), exp_avg_sq=torch.zeros_like(chunk.init))
        x = chunk.init.clone().requires_grad_(True)
        final_x = x  # (R, ...) every row's answer: x itself until rows retire, then written as they do
        blocks, masks, alive = list(chunk.blocks), list(chunk.masks), list(chunk.alive)
        steps_run = torch.full((n_rows,), settings.steps, dtype=torch.long)

        for step in range(settings.steps):
            lr_now = lr * (1 - decay * step)
            inputs = assemble(x, state.get("free"), state.get("true_embed"))
            # Losses piece by piece (rows of block j are alive[j + 1]:alive[j]), not on a concatenated output.
            row_loss = torch.cat([
                row_losses(out, state["target"][lo:hi], state["weight"][lo:hi], state["n_pos"][lo:hi], settings)
                for lo, hi, out in zip(alive[-1:0:-1], alive[-2::-1], forward_pieces(model, inputs, alive)) if hi > lo
            ])
            (grad,) = torch.autograd.grad((row_loss * state["row_weight"]).sum(), x)
            with torch.no_grad():
                bad = ~torch.isfinite(row_loss) & (state["first_bad"] < 0)
                state["first_bad"].masked_fill_(bad, step)
                if adam:  # torch.optim.Adam's single-tensor update, step for step
                    t = step + 1
                    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                    exp_avg.lerp_(grad, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denom = exp_avg_sq.sqrt().div_((1 - beta2**t) ** 0.5).add_(ADAM_EPS)
                    x.addcdiv_(exp_avg, denom, value=-lr_now / (1 - beta1**t))
                else:
                    x.add_(grad, alpha=-lr_now)
            del grad, row_loss, inputs

            is_last = step == settings.steps - 1
            if (step + 1) % CHECK_EVERY == 0 or is_last:
                raise_if_bad(state["first_bad"], blocks, masks)
                if settings.patience is None or is_last:
                    continue
                with torch.no_grad():
                    ids = check_ids(x)  # (Ra, T)
                    if "last_ids" not in state:  # first look: a decode counts as unchanged from here on
                        state["last_ids"] = ids
                        state["last_change"] = torch.full_like(state["index"], step)
                        continue
                    changed = ((ids != state["last_ids"]) & state["watch"]).any(1)
                    state["last_change"].masked_fill_(changed, step)
                    state["last_ids"] = ids
                    keep = step - state["last_change"] < settings.patience
                    kept = keep.nonzero().squeeze(1)  # the host sync of this check
                    if kept.shape[0] == keep.shape[0]:
                        continue
                    done = (~keep).nonzero().squeeze(1)
                    final_x.index_copy_(0, state["index"][done], x.index_select(0, done))
                    steps_run[state["index"][done].cpu()] = step + 1
                    if kept.shape[0] == 0:
                        break
                    kept_list = kept.tolist()
                    blocks = [blocks[i] for i in kept_list]  # still descending: alive rows stay a prefix
                    masks = [masks[i] for i in kept_list]
                    alive = alive_counts(blocks)
                    state = {name: value.index_select(0, kept) for name, value in state.items()}
                    x = x.index_select(0, kept).requires_grad_(True)
        else:
            if x is not final_x:
                with torch.no_grad():
                    final_x.index_copy_(0, state["index"], x)
        final_x = final_x.detach()

        with torch.no_grad():
            final_in = assemble(final_x, chunk.free, chunk.true_embed)
            final, ratio = chunk.evaluate(model, final_in, settings)
            scores = param.scores(final_x[:, :t_prompt], final_in[:, :t_prompt], chunk.pinv, allowed)
            candidates = topk_ids(scores, settings.top_k, settings.allowed_tokens)
        bad = ~torch.isfinite(final)
        if bad.any():
            raise_if_bad(torch.where(bad, settings.steps, -1), chunk.blocks, chunk.masks)
        return Answers(topk_ids=candidates, final_loss=final, distance_ratio=ratio, steps_run=steps_run)
