"""How an inversion is run: `ProbeSettings`, recorded with every result row."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lmrep.probe.inputs import INPUTS
from models.surface import ProbeSurface

EXACT = "exact"  # the exact solver (lmrep.probe.exact): every candidate token scored, no optimisation
METHODS = (*INPUTS, EXACT)
LOSSES = ("l1", "l2", "cosine", "mix")
OPTIMIZERS = ("adam", "gd")
CONTEXTS = ("prompt", "padded")
FREES = ("all", "real", "masked")
LR_FINAL_FRACTION = 0.1  # the lr decays linearly to lr/10 over the run, as in the source


@dataclass
class ProbeSettings:
    """How an inversion is run; every result row records these."""

    method: str = "embedding"
    """embedding: optimise x in embedding space, decode x @ pinv(W_E); onehot: optimise
    vocabulary-sized logits a, x = softmax(a) @ W_E, decode argmax/top-k of a; exact: no optimisation,
    every candidate token is scored at every position with the others held at their true tokens
    (identifiability, the ceiling under the gradient methods; lmrep.probe.exact). lr, steps,
    optimizer, init_scale and patience do not apply to exact."""
    loss_fn: str = "l1"
    """Distance between block outputs: l1 | l2 | cosine | mix ((1-w) l1 + w cosine)."""
    mix_weight: float = 0.5
    """w in the mix loss."""
    optimizer: str = "adam"
    """adam, or gd: plain gradient descent on the summed distance, as in the source."""
    lr: float | None = None
    """Starting learning rate; None takes the model family's measured default (its `probe_lr`)."""
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
    unit logit noise for onehot."""
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
    result still depends only on itself. None runs every row for all steps. 100 kept recovery
    within one masked token of running all steps (benchmarks/RESULTS.md, "patience")."""
    max_rows: int | None = None
    """Solve at most this many (block, mask, prompt) rows at once, to bound memory. None: all
    rows at once on a GPU; on a CPU, chunks of about CPU_CHUNK_POSITIONS positions (rows x
    context length). Rows are independent, so chunking changes no result."""

    def __post_init__(self) -> None:
        for name, allowed in (("method", METHODS), ("loss_fn", LOSSES), ("optimizer", OPTIMIZERS),
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
        """A copy with None defaults filled in: lr from the family's `probe_lr`, init_scale from the embedding std."""
        if self.method == EXACT:  # nothing is optimised: no lr, no start
            return dataclasses.replace(self)
        lr = self.lr
        if lr is None:
            lr = surface.probe_lr.get((self.method, self.optimizer))
            if lr is None:
                raise ValueError(
                    f"no default lr for method={self.method}, optimizer={self.optimizer}, family "
                    f"{surface.family!r}: set lr or measure one with lmrep.probe.calibrate_lr"
                )
        init_scale = self.init_scale
        if init_scale is None:
            init_scale = INPUTS[self.method].default_init_scale(embedding_std)
        return dataclasses.replace(self, lr=lr, init_scale=init_scale)

    def as_record(self) -> dict[str, Any]:
        """The settings as a flat dict of plain values (allowed_tokens as a comma-separated string)."""
        record = dataclasses.asdict(self)
        if self.allowed_tokens is not None:
            record["allowed_tokens"] = ",".join(str(t) for t in self.allowed_tokens)
        return record
