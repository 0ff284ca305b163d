"""The solver seam: a solver takes the prepared rows of one chunk and returns per-row answers.

The engine (`lmrep.probe.engine`) prepares every (block, mask, prompt) row, cuts
the rows into chunks and hands each chunk to a solver; the gradient solver
(`lmrep.probe.gradient`) is the first. Whatever a solver does inside, it answers
with the decoded top-k tokens per position and the per-row numbers below; the
engine turns those into recovery metrics and result rows (`lmrep.schema`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from lmrep.probe.rows import Chunk
from lmrep.probe.settings import ProbeSettings
from models.surface import ProbeSurface


@dataclass
class Answers:
    """Per-row answers of a solver for one chunk of R rows (T prompt positions)."""

    topk_ids: Tensor  # (R, T, k) long: decoded candidates per position, best first
    final_loss: Tensor  # (R,) the distance at the answer
    distance_ratio: Tensor  # (R,) the answer's distance over the shifted true input's
    steps_run: Tensor  # (R,) long: steps the solver spent on each row
    extra: dict[str, Tensor] = field(default_factory=dict)  # (R,) each: solver-specific columns, by column name


class Solver(Protocol):
    """Anything that answers a chunk of rows."""

    def solve(self, model: ProbeSurface, chunk: Chunk, settings: ProbeSettings) -> Answers:
        """Answer every row of `chunk` (settings already resolved for this model)."""
        ...
