"""The row layout: every (block, mask, prompt) row of a probe, its targets, start noise and chunks.

Rows are sorted by block, deepest first, so that the rows still needing block j
always form a prefix and one `run_blocks(h[:alive], j, j + 1)` per block serves
them all (`forward_pieces`). A row's start noise and baseline shift depend only
on (seed, prompt index), so a prompt probed alone gives the same numbers as in
any batch. On a CPU the rows are solved in chunks of about CPU_CHUNK_POSITIONS
positions (why: benchmarks/RESULTS.md, "CPU chunking"); GPUs take all rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmrep import metrics
from lmrep.probe.inputs import INPUTS
from lmrep.probe.settings import EXACT, ProbeSettings
from models.surface import ProbeSurface

CPU_CHUNK_POSITIONS = 2048  # rows solved at once on CPU, in positions: benchmarks/RESULTS.md, section 7
# What each random stream of the probe is for: a tag in its seed hash, so the probe's draws are
# independent of each other and of anything seeded with plain integers (a model's initialisation).
STREAM_INIT, STREAM_SHIFT = "start", "baseline-shift"


def probe_generator(seed: int, prompt_index: int, stream: str) -> torch.Generator:
    """A CPU generator for one (probe seed, prompt index, purpose), seeded through a hash.

    A plain integer seed would collide with other integer-seeded generators: with
    seed arithmetic, prompt 0 of probe seed 0 drew exactly what torch.manual_seed(0)
    draws, the model's own initial embedding.
    """
    key = f"lmrep-probe/{stream}/{seed}/{prompt_index}".encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1)


def prompt_noise(prompt_indices: Sequence[int], shape: tuple[int, int], seed: int, stream: str,
                 device: torch.device, dtype: torch.dtype) -> Tensor:
    """Unit Gaussian noise (B, *shape), one independent draw per prompt index."""
    draws = [torch.randn(shape, generator=probe_generator(seed, int(i), stream)) for i in prompt_indices]
    return torch.stack(draws).to(device=device, dtype=dtype)


def alive_counts(blocks: Sequence[int]) -> list[int]:
    """alive[j] = number of rows whose block is >= j, for j = 0..max block + 1 (blocks sorted descending)."""
    return [sum(b >= j for b in blocks) for j in range(blocks[0] + 2)]


def forward_pieces(model: ProbeSurface, x: Tensor, alive: list[int]) -> list[Tensor]:
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


def forward_rows(model: ProbeSurface, x: Tensor, alive: list[int]) -> Tensor:
    """Each row's hidden state after its own block (R, t, d), rows sorted by block descending."""
    return torch.cat(forward_pieces(model, x, alive))


def row_losses(out: Tensor, target: Tensor, weight: Tensor, n_pos: Tensor, settings: ProbeSettings) -> Tensor:
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

    if settings.loss_fn == "l1":
        return elementwise((out - target).abs())
    if settings.loss_fn == "l2":
        return elementwise((out - target).square())
    if settings.loss_fn == "cosine":
        return cosine()
    w = settings.mix_weight
    return (1 - w) * elementwise((out - target).abs()) + w * cosine()


@dataclass
class Chunk:
    """One chunk of rows, sorted by block descending: everything a solver needs to answer them."""

    ids: Tensor  # (R, Tc) long: the true tokens, padding included
    target: Tensor  # (R, Tc, d) Y = hidden(E[a], block)
    true_embed: Tensor  # (R, Tc, d) E[a]
    region: Tensor  # (R, Tc) bool: loss positions (>= m)
    free: Tensor  # (R, Tc, 1) bool: positions that are optimised
    watch: Tensor  # (R, T) bool: prompt positions whose top-1 the patience check watches (real and free)
    init: Tensor  # (R, Tc, d) or (R, Tc, V) start
    shift: Tensor  # (R, Tc, d) baseline noise, already scaled
    alive: list[int]
    blocks: list[int]
    masks: list[int]
    w_e: Tensor  # (V, d) the embedding matrix
    pinv: Tensor  # (d, V) its pseudo-inverse
    t_prompt: int  # T: prompt positions (the first T of Tc)

    @property
    def n_rows(self) -> int:
        """Rows in the chunk."""
        return self.ids.shape[0]

    def evaluate(self, model: ProbeSurface, model_input: Tensor, settings: ProbeSettings) -> tuple[Tensor, Tensor]:
        """(final loss (R,), distance ratio (R,)) of an answer given as the model input (R, Tc, d)."""
        with torch.no_grad():
            out = forward_rows(model, model_input, self.alive)
            weight = self.region.to(out.dtype)
            final = row_losses(out, self.target, weight, weight.sum(1).clamp_min(1), settings)
            shifted_input = torch.where(self.free, self.true_embed + self.shift, self.true_embed)
            shifted = forward_rows(model, shifted_input, self.alive)
            ratio = metrics.distance_ratio(out, shifted, self.target, self.region)
        return final, ratio


@dataclass
class RowLayout:
    """Every row of a probe call: row r is (block_list[row_b[r]], mask_list[row_m[r]], prompt row_p[r])."""

    ids: Tensor  # (B, Tc) true tokens, padded with the pad token to the probed context
    real: Tensor  # (B, Tc) bool: real prompt positions
    embeds: Tensor  # (B, Tc, d)
    targets: Tensor  # (n_blocks_probed, B, Tc, d)
    init: Tensor  # (B, Tc, width) start points
    shift: Tensor  # (B, Tc, d) baseline shifts
    block_list: list[int]  # descending
    row_b: Tensor  # (R,) index into block_list
    row_p: Tensor  # (R,) prompt row
    row_block: Tensor  # (R,) block k
    row_mask: Tensor  # (R,) mask m
    w_e: Tensor
    pinv: Tensor
    t_prompt: int

    @classmethod
    def build(cls, model: ProbeSurface, ids: Tensor, real: Tensor, *, blocks: Sequence[int], masks: Sequence[int],
              prompt_indices: Sequence[int], settings: ProbeSettings, pinv: Tensor, t_prompt: int) -> RowLayout:
        """Targets of every probed block in one pass through the blocks, rows in block-major order."""
        w_e = model.embedding_matrix.detach()  # (V, d)
        vocab, d = w_e.shape
        n_prompts, t_ctx = ids.shape
        block_list = sorted({int(k) for k in blocks}, reverse=True)  # deepest first: alive rows are a prefix
        mask_list = sorted({int(m) for m in masks})
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

        device, dtype = w_e.device, w_e.dtype
        # Drawn at full context length and cut, so a prompt's start does not depend on T either.
        width = INPUTS[settings.method].width(d, vocab) if settings.method in INPUTS else 0  # exact: no start
        init_shape = (model.context_length, width)
        init = prompt_noise(prompt_indices, init_shape, settings.seed, STREAM_INIT, device, dtype)
        init = init[:, :t_ctx] * (settings.init_scale or 1.0)
        shift = prompt_noise(prompt_indices, (model.context_length, d), settings.seed, STREAM_SHIFT, device, dtype)
        shift = shift[:, :t_ctx] * (settings.baseline_shift * float(w_e.std()))
        return cls(ids=ids, real=real, embeds=embeds, targets=targets, init=init, shift=shift, block_list=block_list,
                   row_b=row_b, row_p=row_p, row_block=torch.tensor(block_list)[row_b],
                   row_mask=torch.tensor(mask_list)[row_m], w_e=w_e, pinv=pinv, t_prompt=t_prompt)

    @property
    def n_rows(self) -> int:
        """All rows of the probe call."""
        return self.row_b.shape[0]

    def chunk_size(self, max_rows: int | None, method: str = "") -> int:
        """Rows per chunk: max_rows, else all on a GPU, else about CPU_CHUNK_POSITIONS positions on a CPU.

        The exact solver takes every row at once (it shares one candidate pass among the
        blocks and masks of a prompt) and bounds its memory by candidate batches instead.
        """
        if method == EXACT:
            return self.n_rows
        if max_rows is not None:
            return max_rows
        if self.ids.device.type == "cpu":
            return max(1, CPU_CHUNK_POSITIONS // self.ids.shape[1])
        return self.n_rows

    def chunks(self, settings: ProbeSettings) -> Iterator[Chunk]:
        """The rows in order, as chunks of `chunk_size(settings.max_rows)` rows."""
        device = self.ids.device
        positions = torch.arange(self.ids.shape[1], device=device)
        size = self.chunk_size(settings.max_rows, settings.method)
        for start in range(0, self.n_rows, size):
            sl = slice(start, min(start + size, self.n_rows))
            rb, rp = self.row_b[sl].to(device), self.row_p[sl].to(device)
            rm = self.row_mask[sl].to(device)
            region = positions[None, :] >= rm[:, None]  # (R, Tc)
            if settings.free == "masked":
                free = ~region
            elif settings.free == "real":
                free = self.real[rp]
            else:
                free = torch.ones_like(region)
            free = free[..., None]
            chunk_blocks = self.row_block[sl].tolist()
            yield Chunk(
                ids=self.ids[rp], target=self.targets[rb, rp], true_embed=self.embeds[rp], region=region, free=free,
                watch=self.real[rp, :self.t_prompt] & free[:, :self.t_prompt, 0], init=self.init[rp],
                shift=self.shift[rp], alive=alive_counts(chunk_blocks), blocks=chunk_blocks,
                masks=self.row_mask[sl].tolist(), w_e=self.w_e, pinv=self.pinv, t_prompt=self.t_prompt,
            )
