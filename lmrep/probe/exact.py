"""The exact solver (method=exact): which tokens does a block's output still determine?

No optimisation: for every row (block k, mask m, prompt) and every scored prompt
position t, every candidate token of the vocabulary (or of `allowed_tokens`) is
put at t with the other positions at their true tokens (padding at the pad
token), and scored by the distance (the settings' loss_fn) of the block-k output
to the true one, Y:

- self (t >= m): causality makes t's output depend only on tokens <= t, so with
  the true prefix t's own output decides t (SipIt's step, arXiv 2510.15511): the
  score is the distance at position t. The model's `candidate_states` gives every
  position of every candidate at every block in one pass (a family's fast path,
  or the generic fallback of `models.surface.SurfaceModel`), and that pass serves
  every mask and every block of the prompt.
- non-self (t < m): only the outputs at positions >= m (padding included) can
  carry t, so the score is the row's distance over its loss region. With one
  masked position (m = 1) the enumeration is exhaustive and one forward per
  candidate batch serves every block; with several, one position is enumerated at
  a time holding the others (coordinate search from the pad token, sweeps until
  nothing changes) and the row is marked `exhaustive: false`.

Per position: the best candidate, the true token's rank, the margin (nearest wrong
candidate's distance minus the true token's) and `identifiable`: the true token is
the unique best, and every wrong candidate is farther than the shifted true input
`e + baseline_shift * std(W_E) * noise` (the distance-ratio baseline of
`rows.Chunk`), at position t for self and over the region for non-self.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmrep.probe.rows import Chunk, forward_rows
from lmrep.probe.settings import ProbeSettings
from lmrep.probe.solver import Answers
from models.surface import ProbeSurface, SurfaceModel

# Candidate positions (candidates x positions) sent through the blocks at once: memory, not results.
CANDIDATE_POSITIONS_CPU = 1 << 14
CANDIDATE_POSITIONS_GPU = 1 << 20
MAX_SWEEPS = 32  # coordinate search: a safety cap; it stops by itself (each change strictly lowers the distance)
NOT_SCORED = -1  # `identifiable` and `true_rank` at positions that were not scored (padding, held positions)


def position_losses(out: Tensor, target: Tensor, settings: ProbeSettings) -> Tensor:
    """The settings' distance at each position (..., t) of out and target (..., t, d).

    Its mean over a row's region is `rows.row_losses`, so a row's exact score is on
    the gradient solver's scale.
    """
    def cosine() -> Tensor:
        return 1 - nn.functional.cosine_similarity(out, target, dim=-1)

    if settings.loss_fn == "l1":
        return (out - target).abs().mean(-1)
    if settings.loss_fn == "l2":
        return (out - target).square().mean(-1)
    if settings.loss_fn == "cosine":
        return cosine()
    w = settings.mix_weight
    return (1 - w) * (out - target).abs().mean(-1) + w * cosine()


@dataclass
class Decision:
    """What the distances of every candidate decide at P positions."""

    best: Tensor  # (P,) long: the nearest candidate
    topk: Tensor  # (P, k) long: candidates by distance, best first
    rank: Tensor  # (P,) long: 1 + candidates strictly nearer than the true token
    margin: Tensor  # (P,) nearest wrong candidate's distance minus the true token's
    identifiable: Tensor  # (P,) bool


def decide(dist: Tensor, true_dist: Tensor, cand_ids: Tensor, true_ids: Tensor, threshold: Tensor,
           top_k: int) -> Decision:
    """Decide P positions from candidate distances (P, C), the true token's (P,) and the baseline (P,)."""
    is_true = cand_ids[None, :] == true_ids[:, None]  # (P, C)
    wrong = dist.masked_fill(is_true, math.inf)
    nearest = wrong.min(1).values  # (P,)
    order = dist.topk(min(top_k, dist.shape[1]), dim=1, largest=False).indices  # (P, k)
    topk = cand_ids[order]
    identifiable = is_true.any(1) & (nearest > true_dist) & (nearest > threshold)
    return Decision(best=topk[:, 0], topk=topk, rank=1 + (wrong < true_dist[:, None]).sum(1),
                    margin=nearest - true_dist, identifiable=identifiable)


class ExactSolver:
    """Exact identifiability of every scored position: every candidate token tried, the others held true."""

    def __init__(self, pad_token_id: int, *, fast: bool = True, batch_positions: int | None = None) -> None:
        """fast: the family's `candidate_states` (False: the generic fallback, for checks and benchmarks);
        batch_positions: candidate positions per forward (None: by device)."""
        self.pad_token_id = pad_token_id
        self.fast = fast
        self.batch_positions = batch_positions

    def _budget(self, device: torch.device) -> int:
        if self.batch_positions is not None:
            return self.batch_positions
        return CANDIDATE_POSITIONS_CPU if device.type == "cpu" else CANDIDATE_POSITIONS_GPU

    def solve(self, model: ProbeSurface, chunk: Chunk, settings: ProbeSettings) -> Answers:
        """Score every candidate at every scored position of every row of the chunk."""
        with torch.no_grad():
            return self._solve(model, chunk, settings)

    def _solve(self, model: ProbeSurface, chunk: Chunk, settings: ProbeSettings) -> Answers:
        device, t_prompt, n_rows = chunk.ids.device, chunk.t_prompt, chunk.n_rows
        vocab = chunk.w_e.shape[0]
        cand_ids = (torch.arange(vocab, device=device) if settings.allowed_tokens is None
                    else torch.tensor(sorted(set(settings.allowed_tokens)), device=device))
        cand_emb = model.embed(cand_ids[None])[0]  # (C, d)
        k_top = min(settings.top_k, cand_ids.shape[0])
        masks = torch.tensor(chunk.masks, device=device)
        visible = torch.arange(t_prompt, device=device)[None, :] >= masks[:, None]  # (R, T)
        scored_self, scored_masked = chunk.watch & visible, chunk.watch & ~visible

        # The baseline: the shifted true input's distance, per position and over each row's region.
        shifted_in = torch.where(chunk.free, chunk.true_embed + chunk.shift, chunk.true_embed)
        base_pos = position_losses(forward_rows(model, shifted_in, chunk.alive), chunk.target, settings)  # (R, Tc)
        region = chunk.region.to(base_pos.dtype)
        n_region = region.sum(1).clamp_min(1)
        base_row = (base_pos * region).sum(1) / n_region  # (R,)

        true_ids = chunk.ids[:, :t_prompt]
        best, rank = true_ids.clone(), torch.full_like(true_ids, NOT_SCORED)
        topk = true_ids[..., None].repeat(1, 1, k_top)
        margin = torch.full(true_ids.shape, math.nan, device=device)
        ident = torch.full_like(true_ids, NOT_SCORED)
        sweeps = torch.ones(n_rows, dtype=torch.long)

        def record(r: int, pos: Tensor, d: Decision) -> None:
            best[r, pos], topk[r, pos], rank[r, pos] = d.best, d.topk, d.rank
            margin[r, pos], ident[r, pos] = d.margin.to(margin.dtype), d.identifiable.long()

        groups, inverse = torch.unique(chunk.ids, dim=0, return_inverse=True)  # rows of one prompt share passes
        for g in range(groups.shape[0]):
            rows = (inverse == g).nonzero().squeeze(1).tolist()
            ids = groups[g]
            states = self._true_states(model, chunk.true_embed[rows[0]], max(chunk.blocks[r] for r in rows))
            self_rows = [r for r in rows if bool(scored_self[r].any())]
            if self_rows:
                dist = self._self_distances(model, states, cand_emb, {chunk.blocks[r] for r in self_rows},
                                            t_prompt, settings)
                for r in self_rows:
                    pos = scored_self[r].nonzero().squeeze(1)
                    d = dist[chunk.blocks[r]]  # (C + 1, T): the candidates, then the true token
                    record(r, pos, decide(d[:-1, pos].T, d[-1, pos], cand_ids, ids[pos], base_pos[r, pos], k_top))
            # Rows with one masked position: exhaustive, one enumeration per (position, mask) for all blocks.
            single: dict[tuple[int, int], list[int]] = {}
            for r in rows:
                pos = scored_masked[r].nonzero().squeeze(1).tolist()
                if len(pos) == 1:
                    single.setdefault((pos[0], chunk.masks[r]), []).append(r)
                elif len(pos) > 1:
                    sweeps[r] = self._search(model, chunk, r, pos, states, cand_ids, cand_emb, settings,
                                             base_row[r], k_top, record)
            for (t, _), members in single.items():
                base = chunk.true_embed[members[0]]
                dist = self._enumerate(model, base, t, cand_emb, base[t:t + 1], states,
                                       {chunk.blocks[r] for r in members}, region[members[0]], settings)
                pos = torch.tensor([t], device=device)
                for r in members:
                    d = dist[chunk.blocks[r]]
                    record(r, pos, decide(d[None, :-1], d[-1:], cand_ids, ids[pos], base_row[r:r + 1], k_top))

        answer = torch.where(chunk.watch, best, true_ids)
        answer_in = chunk.true_embed.clone()
        answer_in[:, :t_prompt] = torch.where(chunk.watch[..., None], model.embed(answer), answer_in[:, :t_prompt])
        final, ratio = chunk.evaluate(model, answer_in, settings)
        extra = row_columns(ident, rank, margin, scored_self, scored_masked)
        extra.update(identifiable=ident.cpu(), true_rank=rank.cpu(), margins=margin.cpu())
        return Answers(topk_ids=topk, final_loss=final, distance_ratio=ratio, steps_run=sweeps, extra=extra)

    def _true_states(self, model: ProbeSurface, embed: Tensor, top: int) -> list[Tensor]:
        """The true states after 0..top blocks of one sequence, each (Tc, d)."""
        states, h = [embed], embed[None]
        for j in range(top):
            h = model.run_blocks(h, j, j + 1)
            states.append(h[0])
        return states

    def _self_distances(self, model: ProbeSurface, states: Sequence[Tensor], cand_emb: Tensor, blocks: set[int],
                        t_prompt: int, settings: ProbeSettings) -> dict[int, Tensor]:
        """Per block: distance (C + 1, T) at each position t with every candidate (then the true token) at t."""
        n_cand, d = cand_emb.shape
        upto = max(blocks)
        prefix = [s[:t_prompt] for s in states]  # causal: positions >= T never matter to t < T
        out = {k: cand_emb.new_empty(n_cand + 1, t_prompt) for k in blocks}
        per = max(1, self._budget(cand_emb.device) // t_prompt)
        states_of = model.candidate_states if self.fast else (
            lambda s, own, n: SurfaceModel.candidate_states(model, s, own, n))  # type: ignore[arg-type]
        for lo in range(0, n_cand + 1, per):
            hi = min(lo + per, n_cand + 1)
            own = cand_emb[lo:min(hi, n_cand), None, :].expand(-1, t_prompt, d)  # (c, T, d)
            if hi > n_cand:
                own = torch.cat([own, prefix[0][None]])
            outs = states_of(prefix[:upto + 1], own, upto)
            for k in blocks:
                out[k][lo:hi] = position_losses(own if k == 0 else outs[k - 1], prefix[k][None], settings)
        return out

    def _enumerate(self, model: ProbeSurface, base: Tensor, t: int, cand_emb: Tensor, extra: Tensor,
                   states: Sequence[Tensor], blocks: set[int], region: Tensor,
                   settings: ProbeSettings) -> dict[int, Tensor]:
        """Per block: region distance (C + e,) with every candidate, then each `extra` (e, d) input, at t of `base`."""
        pool = torch.cat([cand_emb, extra])  # (C + e, d)
        t_ctx = base.shape[0]
        n_region = region.sum().clamp_min(1)
        out = {k: pool.new_empty(pool.shape[0]) for k in blocks}
        per = max(1, self._budget(pool.device) // t_ctx)
        for lo in range(0, pool.shape[0], per):
            h = base[None].repeat(min(per, pool.shape[0] - lo), 1, 1)  # (c, Tc, d)
            h[:, t] = pool[lo:lo + h.shape[0]]
            for j in range(max(blocks) + 1):
                if j in blocks:
                    out[j][lo:lo + h.shape[0]] = (position_losses(h, states[j][None], settings) * region).sum(1) / n_region
                if j < max(blocks):
                    h = model.run_blocks(h, j, j + 1)
        return out

    def _search(self, model: ProbeSurface, chunk: Chunk, r: int, masked: list[int], states: Sequence[Tensor],
                cand_ids: Tensor, cand_emb: Tensor, settings: ProbeSettings, threshold: Tensor, k_top: int,
                record: Callable[[int, Tensor, Decision], None]) -> int:
        """Coordinate search over a row's masked positions from the pad token; records the final decisions."""
        block, true = chunk.blocks[r], chunk.ids[r]
        current = true.clone()
        current[masked] = self.pad_token_id
        base = model.embed(current[None])[0]  # (Tc, d)
        region = chunk.region[r].to(base.dtype)
        last: dict[int, Tensor] = {}
        for sweep in range(1, MAX_SWEEPS + 1):
            changed = False
            for t in masked:
                extra = torch.stack([chunk.true_embed[r, t], base[t]])  # the true token, the current one
                dist = self._enumerate(model, base, t, cand_emb, extra, states, {block}, region, settings)[block]
                last[t] = dist
                i = int(dist[:-2].argmin())
                if float(dist[i]) < float(dist[-1]):  # strictly nearer: the search cannot cycle
                    current[t], base[t] = cand_ids[i], cand_emb[i]
                    changed = True
            if not changed:
                break
        for t, dist in last.items():
            pos = torch.tensor([t], device=true.device)
            record(r, pos, decide(dist[None, :-2], dist[-2:-1], cand_ids, true[pos], threshold[None], k_top))
        return sweep


def row_columns(ident: Tensor, rank: Tensor, margin: Tensor, scored_self: Tensor,
                scored_masked: Tensor) -> dict[str, Tensor]:
    """The per-row columns of the exact solver (`lmrep.schema`) from its per-position decisions (R, T)."""
    scored = scored_self | scored_masked
    hit = ident == 1
    n_self, n_masked = scored_self.sum(1), scored_masked.sum(1)
    self_count, masked_count = (hit & scored_self).sum(1), (hit & scored_masked).sum(1)

    def fraction(count: Tensor, n: Tensor) -> Tensor:
        return torch.where(n > 0, count.double() / n.clamp_min(1), math.nan)

    def per_row(values: Tensor, reduce: Callable[[Tensor], Tensor]) -> Tensor:
        out = []
        for r in range(values.shape[0]):
            v = values[r][scored[r]].double()
            out.append(math.nan if v.numel() == 0 else float(reduce(v)))
        return torch.tensor(out, dtype=torch.float64)

    def median(v: Tensor) -> Tensor:
        return v.quantile(0.5)

    return {
        "self_identifiable": fraction(self_count, n_self).cpu(),
        "nonself_identifiable": fraction(masked_count, n_masked).cpu(),
        "self_identifiable_count": self_count.cpu(), "nonself_identifiable_count": masked_count.cpu(),
        "median_rank": per_row(rank, median), "min_margin": per_row(margin, torch.min),
        "median_margin": per_row(margin, median), "exhaustive": (scored_masked.sum(1) <= 1).cpu(),
    }
