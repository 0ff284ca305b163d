"""The inversion engine: how much of its input does each block represent?

For a model behind the probing surface (`models.surface.ProbeSurface`), prompts
`a`, blocks k and masks m, the engine finds an input x whose block-k output
matches the true one, `Y = hidden(E[a], k)`, on positions >= m only, then
decodes x back to tokens. Tokens at positions >= m are "self" (their own
output is in the loss); tokens at positions < m are "non-self" (only the other
positions' outputs can carry them).

Every (block, mask, prompt) row is solved at once in batched tensors: rows are
sorted by block, deepest first, so that the rows still needing block j always
form a prefix and one `run_blocks(h[:alive], j, j + 1)` per block serves them
all. The total loss is the sum of per-row losses, so each row gets exactly the
gradient it would get alone, and its start noise depends only on
(seed, prompt index): a prompt probed alone gives the same numbers. With
`patience`, each row stops on its own criterion and the batch shrinks to the rows
still running, so the cost follows the unconverged rows.

The engine touches nothing but the surface: `family`, `probe_lr`, `n_blocks`,
`context_length`, `embedding_matrix`, `embed` and `run_blocks`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lmrep import metrics
from models.surface import ProbeSurface, check_block_range, check_length

METHODS = ("embedding", "onehot")
LOSSES = ("l1", "l2", "cosine", "mix")
OPTIMIZERS = ("adam", "gd")
CONTEXTS = ("prompt", "padded")
FREES = ("all", "real", "masked")

LR_FINAL_FRACTION = 0.1  # the lr decays linearly to lr/10 over the run, as in the source
ONEHOT_INIT_SCALE = 1.0  # std of the starting logits for method="onehot" (near-uniform softmax)
CHECK_EVERY = 10  # steps between the (host-syncing) NaN and patience checks
# On a CPU, rows are solved in chunks of about this many positions unless max_rows says otherwise.
# Measured on 2 cores (untrained flat mixer d=256, 8 blocks, masks {0, 1}, 10 steps): 256 padded
# rows (L=128) took 16.0 s in chunks of 16 rows vs 23.5 s at once, 2048 prompt rows (T=32) 31.1 s
# in chunks of 128 vs 68.7 s at once. One big batch allocates tensors above glibc's 32 MiB mmap
# threshold, which go back to the OS when freed, so every step page-faults them in again (sys time
# 12-47 s of those runs); small chunks also stay in cache. GPUs (caching allocator) take all rows.
CPU_CHUNK_POSITIONS = 2048
DEFAULT_CALIBRATION_GRID = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
_SEED_STRIDE = 1_000_003  # a prime: (seed, prompt index, stream) -> distinct generator seeds
_STREAM_INIT, _STREAM_SHIFT = 0, 1


@dataclass
class ProbeSettings:
    """How an inversion is run; every result row records these."""

    method: str = "embedding"
    """embedding: optimise x in embedding space, decode x @ pinv(W_E); onehot: optimise
    vocabulary-sized logits a, x = softmax(a) @ W_E, decode argmax/top-k of a."""
    loss: str = "l1"
    """Distance between block outputs: l1 | l2 | cosine | mix ((1-w) l1 + w cosine)."""
    mix_weight: float = 0.5
    """w in the mix loss."""
    optimizer: str = "adam"
    """adam, or gd: plain gradient descent on the summed distance, as in the source."""
    lr: float | None = None
    """Starting learning rate; None takes the model family's `probe_lr[(method, optimizer)]`."""
    steps: int = 500
    """Optimisation steps; the lr decays linearly from lr to lr/10 over them."""
    context: str = "prompt"
    """prompt: only the prompt's T positions; padded: right-pad to the model's context
    length with the pad token, optimise every position (unless `free` holds some), loss over
    all positions >= m."""
    free: str = "all"
    """all: optimise every position (the source's procedure, padding included); real: hold
    the padding at the pad token's embedding and optimise only the real prompt positions (the
    padding is known to whoever padded: only the prompt is unknown); masked: hold positions
    >= m at their true embeddings and optimise only the masked positions < m."""
    top_k: int = 5
    """Candidates per position for top-k recovery."""
    init_scale: float | None = None
    """Std of the Gaussian start; None: std of W_E for embedding (start at the embedding's
    own scale: the source's N(0, 1) fails llama, whose embeddings have std ~0.02), or
    ONEHOT_INIT_SCALE logit noise for onehot."""
    baseline_shift: float = 0.05
    """The distance-ratio baseline is hidden(e + baseline_shift * std(W_E) * N(0, 1)); for
    N(0, 1) embeddings this is the source's e + N(0, 1/20)."""
    seed: int = 0
    """Seeds the start noise and the baseline shift, per prompt index."""
    allowed_tokens: list[int] | None = None
    """Restricted-vocabulary decoding: only these token ids can be decoded."""
    patience: int | None = None
    """Retire each row once its top-1 decode (over its real, optimised prompt positions) is
    unchanged for this many steps, checked every CHECK_EVERY steps (so rounded up to a
    multiple of it); a retired row keeps its x and later steps run only the others. A row's
    result still depends only on itself. None runs every row for all steps. Measured (padded,
    every position free, benchmarks/RESULTS.md): non-self decodes move for ~150 steps, so 100
    kept recovery within one masked token of running all steps while 20-50 lost several."""
    max_rows: int | None = None
    """Solve at most this many (block, mask, prompt) rows at once, to bound memory. None: all
    rows at once on a GPU; on a CPU, chunks of about CPU_CHUNK_POSITIONS positions (rows x
    context length). Rows are independent, so chunking changes no result."""

    def __post_init__(self) -> None:
        for name, allowed in (("method", METHODS), ("loss", LOSSES), ("optimizer", OPTIMIZERS),
                              ("context", CONTEXTS), ("free", FREES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown probe {name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if not 0.0 <= self.mix_weight <= 1.0:
            raise ValueError(f"mix_weight must be in [0, 1], got {self.mix_weight}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.init_scale is not None and not self.init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {self.init_scale}")
        if self.baseline_shift <= 0:
            raise ValueError(f"baseline_shift must be positive, got {self.baseline_shift}")
        if self.allowed_tokens is not None and len(self.allowed_tokens) == 0:
            raise ValueError("allowed_tokens is empty: give at least one token id, or None for the whole vocabulary")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {self.max_rows}")

    def resolved(self, surface: ProbeSurface | type[ProbeSurface], embedding_std: float | None = None) -> ProbeSettings:
        """A copy with None defaults filled in: lr from the surface's probe_lr, init_scale from the embedding std."""
        lr = self.lr
        if lr is None:
            key = (self.method, self.optimizer)
            if key not in surface.probe_lr:
                raise ValueError(
                    f"no default lr for method={self.method}, optimizer={self.optimizer}, family {surface.family!r}: "
                    "set lr or measure one with lmrep.probe.calibrate_lr"
                )
            lr = surface.probe_lr[key]
        init_scale = self.init_scale
        if init_scale is None:
            if self.method == "onehot":
                init_scale = ONEHOT_INIT_SCALE
            elif embedding_std is not None:
                init_scale = float(embedding_std)
        return dataclasses.replace(self, lr=lr, init_scale=init_scale)

    def as_record(self) -> dict[str, Any]:
        """The settings as a flat dict of plain values (allowed_tokens as a comma-separated string)."""
        record = dataclasses.asdict(self)
        if self.allowed_tokens is not None:
            record["allowed_tokens"] = ",".join(str(t) for t in self.allowed_tokens)
        return record


@dataclass
class ProbeResult:
    """Per-row results of one probe; row r is (block[r], mask[r], prompt_index[r]).

    Token tensors cover the prompt's T positions; `real_mask` marks the real
    (non-padding) ones, over which every accuracy is taken.
    """

    block: Tensor  # (R,) long
    mask: Tensor  # (R,) long
    prompt_index: Tensor  # (R,) long
    target_ids: Tensor  # (R, T) long
    real_mask: Tensor  # (R, T) bool
    recovered_ids: Tensor  # (R, T) long, top-1
    topk_ids: Tensor  # (R, T, k) long, best first
    self_acc: Tensor  # (R,) float64
    nonself_acc: Tensor  # (R,) float64, NaN where m = 0
    self_topk_acc: Tensor  # (R,) float64
    nonself_topk_acc: Tensor  # (R,) float64, NaN where m = 0
    exact: Tensor  # (R,) bool: every real position recovered
    loss: Tensor  # (R,) final per-row loss
    distance_ratio: Tensor  # (R,) < 1: as close as the shifted true input
    counts: dict[str, Tensor]  # (R,) long each: n_real, n_self, n_nonself, *_correct
    steps_run: Tensor  # (R,) long: steps actually run (fewer with patience)
    settings: ProbeSettings = field(default_factory=ProbeSettings)  # resolved

    def rows(self) -> list[dict[str, Any]]:
        """One dict of plain Python values per row (ids cut to the real length, NaN -> None)."""
        record = self.settings.as_record()
        out = []
        for r in range(self.block.shape[0]):
            n = int(self.counts["n_real"][r])
            row: dict[str, Any] = {
                "prompt_index": int(self.prompt_index[r]),
                "block": int(self.block[r]),
                "mask": int(self.mask[r]),
                "target_ids": self.target_ids[r, :n].tolist(),
                "recovered_ids": self.recovered_ids[r, :n].tolist(),
                "topk_ids": self.topk_ids[r, :n].tolist(),
            }
            for name in ("self_acc", "nonself_acc", "self_topk_acc", "nonself_topk_acc"):
                row[name] = _float_or_none(getattr(self, name)[r])
            row["exact"] = bool(self.exact[r])
            row["final_loss"] = _float_or_none(self.loss[r])
            row["distance_ratio"] = _float_or_none(self.distance_ratio[r])
            row.update({name: int(value[r]) for name, value in self.counts.items()})
            row["steps_run"] = int(self.steps_run[r])
            row.update(record)
            out.append(row)
        return out


def _float_or_none(x: Tensor) -> float | None:
    """A scalar tensor as a float, NaN as None."""
    value = float(x)
    return None if math.isnan(value) else value


# ---------------------------------------------------------------- pieces of the engine


def _generator(seed: int, prompt_index: int, stream: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, prompt index, stream)."""
    return torch.Generator().manual_seed(((seed * _SEED_STRIDE + prompt_index) * 2 + stream) % (2**63))


def _prompt_noise(prompt_indices: Sequence[int], shape: tuple[int, int], seed: int, stream: int,
                  device: torch.device, dtype: torch.dtype) -> Tensor:
    """Unit Gaussian noise (B, *shape), one independent draw per prompt index."""
    draws = [torch.randn(shape, generator=_generator(seed, int(i), stream)) for i in prompt_indices]
    return torch.stack(draws).to(device=device, dtype=dtype)


def _forward_pieces(model: nn.Module, x: Tensor, alive: list[int]) -> list[Tensor]:
    """Each row's hidden state after its own block, one piece per block, rows sorted by block descending.

    alive[j] = number of rows whose block is >= j (a prefix), alive[k_max + 1] = 0; the
    pieces, deepest block first, concatenate to the rows in order.
    """
    pieces = []
    h = x  # (alive[0], t, d): state after j blocks for the rows that need it
    for j in range(len(alive) - 1):
        pieces.append(h[alive[j + 1]:])  # rows whose block is j are done
        if alive[j + 1] > 0:
            h = model.run_blocks(h[: alive[j + 1]], j, j + 1)
    return pieces[::-1]


def _forward_rows(model: nn.Module, x: Tensor, alive: list[int]) -> Tensor:
    """Each row's hidden state after its own block (R, t, d), rows sorted by block descending."""
    return torch.cat(_forward_pieces(model, x, alive))


def _alive_counts(blocks: Sequence[int]) -> list[int]:
    """alive[j] = number of rows whose block is >= j, for j = 0..max block + 1 (blocks sorted descending)."""
    return [sum(b >= j for b in blocks) for j in range(blocks[0] + 2)]


def _row_losses(out: Tensor, target: Tensor, weight: Tensor, n_pos: Tensor, settings: ProbeSettings) -> Tensor:
    """Per-row mean distance over each row's loss region -> (R,).

    weight (R, T) is the region as floats and n_pos (R,) its clamped size, both
    computed once per solve rather than per step.
    """
    d = out.shape[-1]

    def elementwise(values: Tensor) -> Tensor:
        return (values.sum(-1) * weight).sum(1) / (n_pos * d)

    def cosine() -> Tensor:
        dist = 1 - nn.functional.cosine_similarity(out, target, dim=-1)  # (R, T)
        return (dist * weight).sum(1) / n_pos

    if settings.loss == "l1":
        return elementwise((out - target).abs())
    if settings.loss == "l2":
        return elementwise((out - target).square())
    if settings.loss == "cosine":
        return cosine()
    w = settings.mix_weight
    return (1 - w) * elementwise((out - target).abs()) + w * cosine()


def _row_weights(region: Tensor, d: int, settings: ProbeSettings) -> Tensor:
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


def decoding_logits(x: Tensor, pinv: Tensor | None, allowed_tokens: Sequence[int] | None = None) -> Tensor:
    """Decoding scores (..., V'): x @ pinv(W_E) for embeddings, or x itself for onehot logits (pinv None).

    With allowed_tokens, only their columns are kept (V' = len(allowed_tokens)).
    """
    logits = x if pinv is None else x @ pinv
    if allowed_tokens is not None:
        logits = logits[..., list(allowed_tokens)]
    return logits


def topk_ids(logits: Tensor, k: int, allowed_tokens: Sequence[int] | None = None) -> Tensor:
    """Top-k token ids (..., k), best first, from `decoding_logits` (mapped back to vocabulary ids)."""
    idx = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    if allowed_tokens is not None:
        idx = torch.tensor(list(allowed_tokens), device=idx.device)[idx]
    return idx


@dataclass
class _Rows:
    """One chunk of rows: what its optimisation needs."""

    target: Tensor  # (R, Tc, d) Y
    true_embed: Tensor  # (R, Tc, d) E[a]
    region: Tensor  # (R, Tc) bool: loss positions (>= m)
    free: Tensor  # (R, Tc, 1) bool: positions that are optimised
    watch: Tensor  # (R, T) bool: prompt positions whose top-1 the patience check watches (real and free)
    init: Tensor  # (R, Tc, d) or (R, Tc, V) start
    shift: Tensor  # (R, Tc, d) baseline noise, already scaled
    alive: list[int]
    blocks: list[int]
    masks: list[int]


ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which the engine used before its Adam was by hand
ADAM_EPS = 1e-8


def _solve(model: nn.Module, rows: _Rows, w_e: Tensor, pinv: Tensor, t_prompt: int,
           settings: ProbeSettings) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Optimise one chunk; returns (decoding logits (R, T, V'), final loss (R,), ratio (R,), steps run (R,)).

    The optimiser (Adam or GD) is written out on the row tensors so that its state
    can follow the rows: with patience, a row whose top-1 decode has settled is
    retired (its x is its answer) and every per-row tensor is compacted to the
    rows still active. Compaction keeps the order, so the rows needing block j
    stay a prefix. Only check steps (every CHECK_EVERY) sync with the host.
    """
    onehot, adam = settings.method == "onehot", settings.optimizer == "adam"
    hold = settings.free != "all"  # else every position is free: no per-step where
    n_rows = rows.init.shape[0]
    lr = float(settings.lr)  # type: ignore[arg-type]
    decay = (1 - LR_FINAL_FRACTION) / max(settings.steps - 1, 1)
    beta1, beta2 = ADAM_BETAS
    # Check-step decoding: scores over the allowed columns, argmax only (ids need not be mapped back).
    allowed = None if settings.allowed_tokens is None else torch.tensor(settings.allowed_tokens, device=w_e.device)
    check_pinv = pinv if allowed is None else pinv[:, allowed]

    def assemble(x: Tensor, free: Tensor, true_embed: Tensor | None) -> Tensor:
        e = torch.softmax(x, -1) @ w_e if onehot else x
        return torch.where(free, e, true_embed) if hold else e  # held positions stay true

    def check_ids(x: Tensor) -> Tensor:
        xt = x[:, :t_prompt]
        if onehot:
            return (xt if allowed is None else xt[..., allowed]).argmax(-1)
        return (xt @ check_pinv).argmax(-1)

    # Per-row state of the active rows (all of them at first), compacted together as rows retire.
    weight = rows.region.to(rows.target.dtype)  # (R, Tc)
    state: dict[str, Tensor] = {
        "index": torch.arange(n_rows, device=rows.init.device),  # chunk row of each active row
        "target": rows.target, "weight": weight, "n_pos": weight.sum(1).clamp_min(1),
        "row_weight": _row_weights(rows.region, w_e.shape[1], settings), "watch": rows.watch,
        "first_bad": torch.full((n_rows,), -1, dtype=torch.long, device=rows.init.device),
    }
    if hold:
        state.update(free=rows.free, true_embed=rows.true_embed)
    if adam:
        state.update(exp_avg=torch.zeros_like(rows.init), exp_avg_sq=torch.zeros_like(rows.init))
    x = rows.init.clone().requires_grad_(True)
    final_x = x  # (R, ...) every row's answer: x itself until rows retire, then written as they do
    blocks, masks, alive = list(rows.blocks), list(rows.masks), list(rows.alive)
    steps_run = torch.full((n_rows,), settings.steps, dtype=torch.long)

    for step in range(settings.steps):
        lr_now = lr * (1 - decay * step)
        inputs = assemble(x, state.get("free"), state.get("true_embed"))  # type: ignore[arg-type]
        # Losses piece by piece (rows of block j are alive[j + 1]:alive[j]), not on a concatenated output.
        row_loss = torch.cat([
            _row_losses(out, state["target"][lo:hi], state["weight"][lo:hi], state["n_pos"][lo:hi], settings)
            for lo, hi, out in zip(alive[-1:0:-1], alive[-2::-1], _forward_pieces(model, inputs, alive)) if hi > lo
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
            _raise_if_bad(state["first_bad"], blocks, masks)
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
                alive = _alive_counts(blocks)
                state = {name: value.index_select(0, kept) for name, value in state.items()}
                x = x.index_select(0, kept).requires_grad_(True)
    else:
        if x is not final_x:
            with torch.no_grad():
                final_x.index_copy_(0, state["index"], x)
    final_x = final_x.detach()

    with torch.no_grad():
        final_in = assemble(final_x, rows.free, rows.true_embed)
        out = _forward_rows(model, final_in, rows.alive)
        weight = rows.region.to(out.dtype)
        final = _row_losses(out, rows.target, weight, weight.sum(1).clamp_min(1), settings)
        shifted_input = torch.where(rows.free, rows.true_embed + rows.shift, rows.true_embed)
        shifted = _forward_rows(model, shifted_input, rows.alive)
        ratio = metrics.distance_ratio(out, shifted, rows.target, rows.region)
        source = final_x if onehot else final_in
        logits = decoding_logits(source[:, :t_prompt], None if onehot else pinv, settings.allowed_tokens)
    bad = ~torch.isfinite(final)
    if bad.any():
        _raise_if_bad(torch.where(bad, settings.steps, -1), rows.blocks, rows.masks)
    return logits, final, ratio, steps_run


def _raise_if_bad(first_bad: Tensor, blocks: Sequence[int], masks: Sequence[int]) -> None:
    """Raise FloatingPointError naming the first non-finite step, block and mask (of rows in this order)."""
    bad = first_bad >= 0
    if bool(bad.any()):
        r = int(torch.nonzero(bad)[first_bad[bad].argmin()])
        raise FloatingPointError(
            f"non-finite probe loss at step {int(first_bad[r])}, block {blocks[r]}, mask {masks[r]}"
        )


class _frozen:
    """Context manager: model in eval mode with parameters frozen; both restored on exit."""

    def __init__(self, model: nn.Module) -> None:
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


# ---------------------------------------------------------------- the public entry points


def probe(
    model: nn.Module,
    prompt_ids: Tensor,
    *,
    blocks: Sequence[int],
    masks: Sequence[int],
    settings: ProbeSettings,
    pad_token_id: int,
    prompt_lengths: Tensor | None = None,
    prompt_indices: Sequence[int] | None = None,
    pinv: Tensor | None = None,
) -> ProbeResult:
    """Invert every block in `blocks` under every mask in `masks` for every prompt (B, T), all at once.

    prompt_lengths (B,) gives real lengths of right-padded prompts (default: all T);
    prompt_indices (B,) names the prompts (default 0..B-1) and seeds their start
    noise; pinv is a precomputed pinv(W_E) (d, V).
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] == 0 or prompt_ids.shape[1] == 0:
        raise ValueError(f"empty prompt set: expected prompt ids of shape (B >= 1, T >= 1), got {tuple(prompt_ids.shape)}")
    n_prompts, t_prompt = prompt_ids.shape
    check_length(t_prompt, model.context_length)
    if len(blocks) == 0 or len(masks) == 0:
        raise ValueError("no blocks or no masks to probe: give at least one of each")
    n = model.n_blocks
    for k in blocks:
        check_block_range(int(k), n)
    for m in masks:
        if not 0 <= int(m) < t_prompt:
            raise ValueError(f"mask {m} is out of range: masks must be in 0..{t_prompt - 1} for {t_prompt}-token prompts")
    block_list = sorted({int(k) for k in blocks}, reverse=True)  # deepest first: alive rows are a prefix
    mask_list = sorted({int(m) for m in masks})
    if prompt_indices is None:
        prompt_indices = list(range(n_prompts))
    if len(prompt_indices) != n_prompts:
        raise ValueError(f"{len(prompt_indices)} prompt indices for {n_prompts} prompts")
    device = model.embedding_matrix.device
    if prompt_lengths is None:
        prompt_lengths = torch.full((n_prompts,), t_prompt, dtype=torch.long)
    prompt_lengths = prompt_lengths.to(device=device, dtype=torch.long)
    if prompt_lengths.shape != (n_prompts,) or bool((prompt_lengths < 1).any() | (prompt_lengths > t_prompt).any()):
        raise ValueError(f"prompt_lengths must be (B,) = ({n_prompts},) with values in 1..{t_prompt}")

    w_e = model.embedding_matrix.detach()  # (V, d)
    vocab, d = w_e.shape
    if settings.allowed_tokens is not None and not all(0 <= t < vocab for t in settings.allowed_tokens):
        raise ValueError(f"allowed_tokens must be token ids in 0..{vocab - 1}")
    w_std = float(w_e.std())
    settings = settings.resolved(model, w_std)
    if pinv is None:
        pinv = torch.linalg.pinv(w_e)  # (d, V): once per probe call, never per step
    t_ctx = model.context_length if settings.context == "padded" else t_prompt

    positions = torch.arange(t_ctx, device=device)
    real = positions[None, :] < prompt_lengths[:, None]  # (B, Tc): real prompt positions
    ids = torch.full((n_prompts, t_ctx), pad_token_id, dtype=torch.long, device=device)
    ids[:, :t_prompt] = prompt_ids.to(device)
    ids = torch.where(real, ids, pad_token_id)

    with _frozen(model):
        with torch.no_grad():
            embeds = model.embed(ids)  # (B, Tc, d)
            states = {0: embeds}
            h = embeds
            for j in range(block_list[0]):  # one pass through the blocks for every target
                h = model.run_blocks(h, j, j + 1)
                states[j + 1] = h
            targets = torch.stack([states[k] for k in block_list])  # (n_blocks_probed, B, Tc, d)
        del states, h

        # Row r = (block, mask, prompt) in block-major order, deepest block first.
        row_b = torch.arange(len(block_list)).repeat_interleave(len(mask_list) * n_prompts)
        row_m = torch.arange(len(mask_list)).repeat_interleave(n_prompts).repeat(len(block_list))
        row_p = torch.arange(n_prompts).repeat(len(block_list) * len(mask_list))
        row_block = torch.tensor(block_list)[row_b]
        row_mask = torch.tensor(mask_list)[row_m]

        init_shape = (model.context_length, vocab if settings.method == "onehot" else d)
        # Drawn at full context length and cut, so a prompt's start does not depend on T either.
        init = _prompt_noise(prompt_indices, init_shape, settings.seed, _STREAM_INIT, device, w_e.dtype)
        init = init[:, :t_ctx] * settings.init_scale
        shift = _prompt_noise(prompt_indices, (model.context_length, d), settings.seed, _STREAM_SHIFT, device, w_e.dtype)
        shift = shift[:, :t_ctx] * (settings.baseline_shift * w_std)

        n_rows = row_b.shape[0]
        chunk = settings.max_rows or n_rows
        if settings.max_rows is None and device.type == "cpu":
            chunk = max(1, CPU_CHUNK_POSITIONS // t_ctx)
        logits_parts, loss_parts, ratio_parts, steps_parts = [], [], [], []
        for start in range(0, n_rows, chunk):
            sl = slice(start, min(start + chunk, n_rows))
            rb, rp = row_b[sl].to(device), row_p[sl].to(device)
            rm = row_mask[sl].to(device)
            chunk_blocks = row_block[sl].tolist()
            region = positions[None, :] >= rm[:, None]  # (R, Tc)
            if settings.free == "masked":
                free = ~region
            elif settings.free == "real":
                free = real[rp]
            else:
                free = torch.ones_like(region)
            free = free[..., None]
            rows = _Rows(
                target=targets[rb, rp], true_embed=embeds[rp], region=region, free=free,
                watch=real[rp, :t_prompt] & free[:, :t_prompt, 0], init=init[rp], shift=shift[rp],
                alive=_alive_counts(chunk_blocks), blocks=chunk_blocks, masks=row_mask[sl].tolist(),
            )
            logits, final, ratio, steps_run = _solve(model, rows, w_e, pinv, t_prompt, settings)
            logits_parts.append(topk_ids(logits, settings.top_k, settings.allowed_tokens))
            loss_parts.append(final)
            ratio_parts.append(ratio)
            steps_parts.append(steps_run)

    topk = torch.cat(logits_parts).cpu()
    recovered = topk[..., 0]
    target_ids = ids[:, :t_prompt].cpu()[row_p]
    real_rows = real[:, :t_prompt].cpu()[row_p]
    top1 = metrics.recovery(recovered, target_ids, real_rows, row_mask)
    topk_stats = metrics.topk_recovery(topk, target_ids, real_rows, row_mask)
    counts = {name: top1[name] for name in ("n_real", "n_self", "n_nonself", "self_correct", "nonself_correct")}
    counts.update({name: topk_stats[name] for name in ("self_topk_correct", "nonself_topk_correct")})
    return ProbeResult(
        block=row_block, mask=row_mask, prompt_index=torch.tensor(list(prompt_indices))[row_p],
        target_ids=target_ids, real_mask=real_rows, recovered_ids=recovered, topk_ids=topk,
        self_acc=top1["self_acc"], nonself_acc=top1["nonself_acc"],
        self_topk_acc=topk_stats["self_topk_acc"], nonself_topk_acc=topk_stats["nonself_topk_acc"],
        exact=top1["exact"], loss=torch.cat(loss_parts).cpu(), distance_ratio=torch.cat(ratio_parts).cpu(),
        counts=counts, steps_run=torch.cat(steps_parts), settings=settings,
    )


def calibrate_lr(
    model: nn.Module,
    prompt_ids: Tensor,
    *,
    grid: Sequence[float] = DEFAULT_CALIBRATION_GRID,
    settings: ProbeSettings,
    pad_token_id: int,
    prompt_lengths: Tensor | None = None,
) -> tuple[float, dict[float, float]]:
    """Pick the lr in `grid` with the best block-1 self (m = 0) top-1 recovery, ties to the lower final loss.

    Returns (best lr, {lr: pooled self accuracy}); for a model family whose probe_lr has no entry for
    the settings' (method, optimizer).
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
        acc = float(result.counts["self_correct"].sum()) / max(int(result.counts["n_self"].sum()), 1)
        loss = float(result.loss.mean())
        scores[float(lr)] = acc
        candidate = (-acc, loss if math.isfinite(loss) else math.inf, float(lr))
        if best is None or candidate < best:
            best = candidate
    assert best is not None
    return best[2], scores
