"""What the gradient solver optimises, per `ProbeSettings.method`, and how it decodes to tokens.

- embedding (indirect): x is an embedding (d per position); decode x @ pinv(W_E);
- onehot (direct): x is vocabulary-sized logits a; the input is softmax(a) @ W_E; decode a.

Each parametrisation answers the same four questions, so no other code branches on the method.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

ONEHOT_INIT_SCALE = 1.0  # std of the starting logits for method="onehot" (near-uniform softmax)


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


class EmbeddingInput:
    """x is the input embedding itself."""

    def width(self, d: int, vocab: int) -> int:
        """Features per position of x."""
        return d

    def default_init_scale(self, embedding_std: float | None) -> float | None:
        """Start at the embedding matrix's own scale."""
        return None if embedding_std is None else float(embedding_std)

    def to_embedding(self, x: Tensor, w_e: Tensor) -> Tensor:
        """The model input (R, T, d) for x."""
        return x

    def scores(self, x: Tensor, model_input: Tensor, pinv: Tensor, allowed: Tensor | None) -> Tensor:
        """Decoding scores (R, T, V') over the allowed tokens (every token when None)."""
        return model_input @ (pinv if allowed is None else pinv[:, allowed])


class OneHotInput:
    """x holds vocabulary logits; the input is the softmax-weighted mixture of embeddings."""

    def width(self, d: int, vocab: int) -> int:
        """Features per position of x."""
        return vocab

    def default_init_scale(self, embedding_std: float | None) -> float | None:
        """Logit noise of ONEHOT_INIT_SCALE: a near-uniform softmax."""
        return ONEHOT_INIT_SCALE

    def to_embedding(self, x: Tensor, w_e: Tensor) -> Tensor:
        """The model input (R, T, d) for x."""
        return torch.softmax(x, -1) @ w_e

    def scores(self, x: Tensor, model_input: Tensor, pinv: Tensor, allowed: Tensor | None) -> Tensor:
        """Decoding scores (R, T, V') over the allowed tokens (every token when None): the logits themselves."""
        return x if allowed is None else x[..., allowed]


INPUTS: dict[str, EmbeddingInput | OneHotInput] = {"embedding": EmbeddingInput(), "onehot": OneHotInput()}
