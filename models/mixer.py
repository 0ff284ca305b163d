"""Masked mixer: a transformer whose attention is replaced by causal token mixing.

A block is `x = x + TokenMix(LN(x)); x = x + MLP(LN(x))`. TokenMix is a linear
map along the sequence axis with weights shared across features (the source's
`Conv1d(L, L, 1)`), lower-triangular so that position i sees only positions
<= i. Three mixings: `flat` (one L x L map), `expanded` (L -> e*L -> L with a
GELU between, causal at both steps) and `parallel` (several flat maps, summed).

Because every mixing is causal, running on the first t < L positions with the
top-left part of each map gives exactly what right-padding to L would give on
those positions, so no padding is ever needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.surface import ModelShape, SurfaceModel, check_positive, probe_lr_table

MIXINGS = ("flat", "expanded", "parallel")


@dataclass
class MixerConfig(ModelShape):
    """Shape of a masked mixer (vocab_size, d_model, n_blocks, context_length: ModelShape; mixing maps are L x L)."""

    mixing: str = "flat"
    """Token mixing: 'flat', 'expanded' or 'parallel'."""
    expansion: int = 1
    """Expansion factor e of the 'expanded' mixing (L -> e*L -> L)."""
    n_parallel: int = 2
    """Number of flat mixings summed by the 'parallel' mixing."""
    mlp_ratio: int = 4
    """Hidden width of the MLP as a multiple of d_model."""

    def __post_init__(self) -> None:
        if self.mixing not in MIXINGS:
            raise ValueError(f"unknown mixing '{self.mixing}': choose one of {', '.join(MIXINGS)}")
        super().__post_init__()
        check_positive(self, ("expansion", "n_parallel", "mlp_ratio"))


class SequenceLinear(nn.Module):
    """A linear map along the sequence axis, shared by all features, with a fixed connectivity mask."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        n_out, n_in = mask.shape
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.bias = nn.Parameter(torch.empty(n_out))
        # Not persistent: the mask follows from the config, so a state_dict can never carry a different one.
        self.register_buffer("mask", mask, persistent=False)
        # Same init as the source's Conv1d(n_in, n_out, 1) (PyTorch's default: kaiming-uniform with
        # a=sqrt(5), i.e. U(+-1/sqrt(fan_in)), fan_in = n_in, counting the masked entries too), so
        # untrained models here match the untrained models the source measured.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(n_in)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, n_out: int) -> Tensor:
        """Map the first x.shape[1] input positions to the first n_out outputs: (b, n_in', d) -> (b, n_out, d)."""
        n_in = x.shape[1]
        # The mask is applied here, inside autograd: masked entries never act and never get a gradient.
        weight = self.weight.masked_fill(~self.mask, 0.0)[:n_out, :n_in]  # (n_out, n_in')
        # One batched product with the weight and bias broadcast over the batch (stride-0 views), not
        # torch.matmul(weight, x), which copies x transposed: benchmarks/RESULTS.md, sections 2-3.
        b = x.shape[0]
        bias = self.bias[:n_out, None].expand(b, n_out, 1)
        return torch.baddbmm(bias, weight.expand(b, -1, -1), x)  # (b, n_out, d)

    def own_weights(self, n_out: int, n_in: int) -> Tensor:
        """The (masked) weights from each input position to each output (n_out, n_in), cut to the first ones."""
        return self.weight.masked_fill(~self.mask, 0.0)[:n_out, :n_in]


def causal_mask(n: int) -> Tensor:
    """Lower-triangular boolean mask: output i may read input j iff j <= i."""
    return torch.ones(n, n, dtype=torch.bool).tril()


class FlatMixing(nn.Module):
    """One causal L x L mixing."""

    def __init__(self, config: MixerConfig) -> None:
        super().__init__()
        self.mix = SequenceLinear(causal_mask(config.context_length))

    def forward(self, x: Tensor) -> Tensor:
        return self.mix(x, x.shape[1])  # (b, t, d)

    def with_own(self, true: Tensor, own: Tensor) -> Tensor:
        """Output at each t when t's input is own[:, t] and the others are `true` (t, d): linear, so the true
        output plus the own term's change, W[t, t] (own_t - true_t)."""
        t = true.shape[0]
        diagonal = self.mix.own_weights(t, t).diagonal()[:, None]  # (t, 1)
        return self(true[None])[0] + diagonal * (own - true)  # (c, t, d)


class ExpandedMixing(nn.Module):
    """Causal L -> e*L -> L mixing with a GELU between.

    Expanded channel c = i*e + r belongs to position i = c // e: it reads inputs
    j <= i, and output i reads channels of positions <= i, so the composition is
    causal for every e.
    """

    def __init__(self, config: MixerConfig) -> None:
        super().__init__()
        self.expansion = config.expansion
        length = config.context_length
        position = torch.arange(length)  # (L,)
        channel_position = torch.arange(length * config.expansion) // config.expansion  # (e*L,)
        self.up = SequenceLinear(position[None, :] <= channel_position[:, None])  # mask (e*L, L)
        self.down = SequenceLinear(channel_position[None, :] <= position[:, None])  # mask (L, e*L)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        h = F.gelu(self.up(x, t * self.expansion))  # (b, e*t, d)
        return self.down(h, t)  # (b, t, d)

    def with_own(self, true: Tensor, own: Tensor) -> Tensor:
        """Output at each t when t's input is own[:, t] and the others are `true` (t, d).

        Only position t's own e channels change (channels of earlier positions read only
        true inputs; later ones are not read by output t), each by W_up[c, t] (own_t - true_t).
        """
        t, e = true.shape[0], self.expansion
        rows = torch.arange(t * e, device=true.device)
        up_own = self.up.own_weights(t * e, t)[rows, rows // e].view(t, e, 1)  # (t, e, 1): channel <- own position
        down_own = self.down.own_weights(t, t * e)[rows // e, rows].view(t, e, 1)  # (t, e, 1): output <- own channels
        pre = self.up(true[None], t * e)[0].view(t, e, -1)  # (t, e, d) true pre-activations
        h_true = F.gelu(pre)
        h_own = F.gelu(pre + up_own * (own - true)[:, :, None])  # (c, t, e, d)
        return self.down(h_true.view(1, t * e, -1), t)[0] + (down_own * (h_own - h_true)).sum(2)  # (c, t, d)


class ParallelMixing(nn.Module):
    """Several flat mixings of the same input, summed."""

    def __init__(self, config: MixerConfig) -> None:
        super().__init__()
        self.mixings = nn.ModuleList(FlatMixing(config) for _ in range(config.n_parallel))

    def forward(self, x: Tensor) -> Tensor:
        return sum(mixing(x) for mixing in self.mixings)  # (b, t, d)

    def with_own(self, true: Tensor, own: Tensor) -> Tensor:
        """Output at each t when t's input is own[:, t] and the others are `true` (t, d): the flat ones summed."""
        return sum(mixing.with_own(true, own) for mixing in self.mixings)  # (c, t, d)


TOKEN_MIXINGS: dict[str, type[nn.Module]] = {
    "flat": FlatMixing,
    "expanded": ExpandedMixing,
    "parallel": ParallelMixing,
}


class MLP(nn.Module):
    """Per-position feed-forward: d -> mlp_ratio*d -> d with GELU."""

    def __init__(self, config: MixerConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.down = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))  # (b, t, d)


class MixerBlock(nn.Module):
    """Pre-norm residual block: token mixing, then an MLP."""

    def __init__(self, config: MixerConfig) -> None:
        super().__init__()
        self.mix_norm = nn.LayerNorm(config.d_model)
        self.mix = TOKEN_MIXINGS[config.mixing](config)
        self.mlp_norm = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mix(self.mix_norm(x))  # (b, t, d)
        x = x + self.mlp(self.mlp_norm(x))  # (b, t, d)
        return x

    def with_own(self, true: Tensor, own: Tensor) -> Tensor:
        """Block output at each t when t's input is own[:, t] (c, t, d) and the others are `true` (t, d)."""
        own = own + self.mix.with_own(self.mix_norm(true), self.mix_norm(own))  # (c, t, d)
        return own + self.mlp(self.mlp_norm(own))  # (c, t, d)


class MaskedMixer(SurfaceModel):
    """Masked mixer language model: embedding -> n mixer blocks -> LayerNorm -> LM head."""

    family: ClassVar[str] = "mixer"
    config_class: ClassVar[type] = MixerConfig
    # Measured on untrained mixers (N(0, 1) embeddings): benchmarks/RESULTS.md, "Default probe learning rates".
    probe_lr: ClassVar[Mapping[tuple[str, str], float]] = probe_lr_table(
        embedding_adam=0.05, embedding_gd=0.02, onehot_adam=0.1, onehot_gd=1.0)

    def __init__(self, config: MixerConfig) -> None:
        super().__init__()
        self.config = config
        # nn.Embedding's default init is N(0, 1), as in the source; no positional embedding,
        # the token mixing already knows the positions.
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(MixerBlock(config) for _ in range(config.n_blocks))
        self.norm = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def candidate_states(self, states: Sequence[Tensor], own: Tensor, upto: int) -> list[Tensor]:
        """Fast path of `SurfaceModel.candidate_states`: each block's token mixing at t is the true prefix's
        fixed part plus the candidate's own term, so every position of every candidate costs one position."""
        out = []
        h = own  # (c, t, d)
        for j, block in enumerate(self.blocks[:upto]):
            h = block.with_own(states[j], h)
            out.append(h)
        return out

    def forward(self, ids: Tensor) -> Tensor:
        """Token ids (b, t) -> next-token logits (b, t, vocab)."""
        x = self.run_blocks(self.embed(ids), 0, self.n_blocks)  # (b, t, d)
        return self.lm_head(self.norm(x))  # (b, t, vocab)
