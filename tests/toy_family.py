"""A toy model family kept outside `models/`, to show that a new family needs only its file, a registry
entry and a YAML: embedding -> n blocks of causal prefix-mean mixing and an MLP -> LM head.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.surface import ModelShape, SurfaceModel, probe_lr_table


@dataclass
class ToyConfig(ModelShape):
    """Shape of a toy causal LM: the shared shape fields and nothing else."""


class PrefixMeanBlock(nn.Module):
    """x + W(mean of x over positions <= i), then a per-position MLP: causal without any mask."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        counts = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[None, :, None]  # (1, t, 1)
        x = x + self.mix(self.norm(x).cumsum(dim=1) / counts)  # (b, t, d)
        return x + self.down(F.gelu(self.up(x)))  # (b, t, d)


class ToyLM(SurfaceModel):
    """A tiny causal LM on the shared surface base: only its embedding, blocks and head are its own."""

    family: ClassVar[str] = "toy"
    config_class: ClassVar[type] = ToyConfig
    # N(0, 1) embeddings like the mixer's, so the mixer's measured Adam lr serves (benchmarks/RESULTS.md).
    probe_lr: ClassVar[Mapping[tuple[str, str], float]] = probe_lr_table(embedding_adam=0.05)

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(PrefixMeanBlock(config.d_model) for _ in range(config.n_blocks))
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        """Token ids (b, t) -> next-token logits (b, t, vocab)."""
        return self.lm_head(self.run_blocks(self.embed(ids), 0, self.n_blocks))  # (b, t, vocab)
