"""The probing surface: the only part of a model the probe engine may touch.

Every model family in `models/` offers it, so the probe never looks inside a
family. Block k's output is the hidden state after k blocks (k = 0 is the
embedding itself); there is no final norm and no LM head in it.

`SurfaceModel` is the base every family derives from: it holds the members all
families compute the same way, so a family file writes only what is its own
(the embedding, running its blocks, the LM head).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


# The config fields every family has (the surface and the data module read them); each must be >= 1.
SHAPE_FIELDS = ("vocab_size", "d_model", "n_blocks", "context_length")


@dataclass
class ModelShape:
    """The shape every family's config dataclass starts from; a family's config adds its own fields."""

    vocab_size: int = 4096
    """Number of token ids the embedding and the LM head cover."""
    d_model: int = 256
    """Width of the hidden state (features per position)."""
    n_blocks: int = 8
    """Number of blocks (a llama's decoder layers, a mixer's mixer blocks)."""
    context_length: int = 128
    """Longest sequence the model accepts (L)."""

    def __post_init__(self) -> None:
        check_positive(self, SHAPE_FIELDS)


def check_positive(config: object, names: Sequence[str]) -> None:
    """Raise a one-line error naming the first of these integer fields that is below 1."""
    for name in names:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")


def probe_lr_table(*, embedding_adam: float | None = None, embedding_gd: float | None = None,
                   onehot_adam: float | None = None, onehot_gd: float | None = None) -> Mapping[tuple[str, str], float]:
    """A family's measured default probe lrs as `SurfaceModel.probe_lr` holds them: {(method, optimizer): lr}."""
    given = {("embedding", "adam"): embedding_adam, ("embedding", "gd"): embedding_gd,
             ("onehot", "adam"): onehot_adam, ("onehot", "gd"): onehot_gd}
    return {key: lr for key, lr in given.items() if lr is not None}


@runtime_checkable
class ProbeSurface(Protocol):
    """What the probe engine needs from a model, and nothing more."""

    family: ClassVar[str]
    probe_lr: ClassVar[Mapping[tuple[str, str], float]]
    config: Any
    blocks: nn.ModuleList

    @property
    def n_blocks(self) -> int:
        """Number of blocks n; `hidden(e, upto=k)` is defined for 0 <= k <= n."""
        ...

    @property
    def context_length(self) -> int:
        """The longest sequence the model accepts (L)."""
        ...

    @property
    def embedding_matrix(self) -> Tensor:
        """The input embedding matrix W_E, shape (vocab, d)."""
        ...

    def embed(self, ids: Tensor) -> Tensor:
        """Token ids (b, t) -> input embeddings (b, t, d)."""
        ...

    def run_blocks(self, h: Tensor, start: int, stop: int) -> Tensor:
        """Apply blocks start..stop-1 to the hidden state after `start` blocks (b, t, d)."""
        ...

    def hidden(self, e: Tensor, upto: int) -> Tensor:
        """Hidden state after `upto` blocks for input embeddings e (b, t, d)."""
        ...

    def candidate_states(self, states: Sequence[Tensor], own: Tensor, upto: int) -> list[Tensor]:
        """States after blocks 1..upto at each position t for input own[:, t] after the true prefix."""
        ...

    def forward(self, ids: Tensor) -> Tensor:
        """Token ids (b, t) -> next-token logits (b, t, vocab)."""
        ...


class SurfaceModel(nn.Module, abc.ABC):
    """Base class of a model family: the shared surface members; a family adds its embedding and blocks."""

    family: ClassVar[str]
    """The family's name in `models.MODEL_FAMILIES` and in checkpoints."""
    config_class: ClassVar[type]
    """The family's config dataclass; `config` is an instance of it."""
    probe_lr: ClassVar[Mapping[tuple[str, str], float]]
    """Measured default probe lr per (method, optimizer); a missing key means "set lr or calibrate"."""
    config: Any
    blocks: nn.ModuleList
    embedding: nn.Embedding  # the input embedding, where a family keeps it (llama overrides embed instead)

    @property
    def n_blocks(self) -> int:
        """Number of blocks n; `hidden(e, upto=k)` is defined for 0 <= k <= n."""
        return len(self.blocks)

    @property
    def context_length(self) -> int:
        """The longest sequence the model accepts (L)."""
        return self.config.context_length

    @property
    def embedding_matrix(self) -> Tensor:
        """The input embedding matrix W_E, shape (vocab, d): `self.embedding`'s, unless a family overrides it."""
        return self.embedding.weight

    def embed(self, ids: Tensor) -> Tensor:
        """Token ids (b, t) -> input embeddings (b, t, d), through `self.embedding` unless overridden."""
        return self.embedding(ids)

    def run_blocks(self, h: Tensor, start: int, stop: int) -> Tensor:
        """Apply blocks start..stop-1 to the hidden state after `start` blocks (b, t, d).

        Blocks that take the hidden state alone run as they are; a family whose blocks
        need more (llama: positions, RoPE, the causal mask) overrides this.
        """
        check_run(start, stop, h.shape[1], self.n_blocks, self.context_length)
        for block in self.blocks[start:stop]:
            h = block(h)  # (b, t, d)
        return h

    def hidden(self, e: Tensor, upto: int) -> Tensor:
        """Hidden state after `upto` blocks for input embeddings e (b, t, d); upto=0 returns e itself."""
        return self.run_blocks(e, 0, upto)

    def candidate_states(self, states: Sequence[Tensor], own: Tensor, upto: int) -> list[Tensor]:
        """States after blocks 1..upto at each position t when t's input is own[:, t] and positions < t are true.

        states[j] (t', d) holds the true hidden states after j blocks (j = 0..upto) of one
        sequence, own (c, t', d) c candidate inputs per position; returns upto tensors
        (c, t', d), the j-th the states after block j + 1. Causality makes position t's
        output depend only on inputs <= t, so "the true prefix, then own[:, t]" decides it.
        This generic version runs every prefix through the blocks (c t'^2 / 2 positions
        per block); a family may override it with a fast path that reuses the true prefix
        (the results must agree to rounding: tests/test_exact.py).
        """
        n_own, t_own, _ = own.shape
        out = [own.new_empty(own.shape) for _ in range(upto)]
        for t in range(t_own):
            h = torch.cat([states[0][None, :t].expand(n_own, t, -1), own[:, t:t + 1]], 1)  # (c, t + 1, d)
            for j in range(upto):
                h = self.run_blocks(h, j, j + 1)
                out[j][:, t] = h[:, t]
        return out

    @abc.abstractmethod
    def forward(self, ids: Tensor) -> Tensor:
        """Token ids (b, t) -> next-token logits (b, t, vocab)."""


def check_block_range(upto: int, n_blocks: int) -> None:
    """Raise a clear error when a block index is outside 0..n_blocks."""
    if not 0 <= upto <= n_blocks:
        raise ValueError(f"block {upto} is out of range: this model has blocks 0..{n_blocks}")


def check_length(t: int, context_length: int) -> None:
    """Raise a clear error when a sequence is longer than the model's context."""
    if t > context_length:
        raise ValueError(f"sequence of {t} tokens is longer than the model's context length {context_length}")


def check_run(start: int, stop: int, t: int, n_blocks: int, context_length: int) -> None:
    """Raise a clear error for a block range start..stop or a length t that a model cannot run."""
    check_block_range(start, n_blocks)
    check_block_range(stop, n_blocks)
    if start > stop:
        raise ValueError(f"block range {start}..{stop} is empty: start must be <= stop")
    check_length(t, context_length)


@torch.no_grad()
def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
