"""A probe sharded over the processes of a `torch.distributed` group (set up by Lightning).

Each rank probes its share of the prompts with their global prompt indices, so
every prompt gets the start noise it gets alone; rank 0 gathers the rows, puts
them in the single-process order and writes the results. A prompt's numbers
depend only on (seed, prompt index), patience or not, so a sharded run writes
the rows a single process writes: the same decoded tokens and accuracies, and
floats equal up to rounding (a BLAS may pick other kernels for another batch
shape; for small models they are bitwise equal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

# Errors that cross ranks keep their type (probe.py turns these into one-line errors).
_SHARED_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls for cls in (ValueError, FloatingPointError, FileNotFoundError, RuntimeError)}


@dataclass(frozen=True)
class Shard:
    """This process's part of a probe sharded over `world_size` processes (rank 0 writes the results)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Shard:
        """The shard of this process in the initialised process group; a single process without one."""
        if dist.is_available() and dist.is_initialized():
            return cls(rank=dist.get_rank(), world_size=dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        """True on the rank that reads and writes the results file."""
        return self.rank == 0

    def prompt_indices(self, n_prompts: int) -> list[int]:
        """Global indices of this rank's prompts: a contiguous block, sizes differing by at most one."""
        base, extra = divmod(n_prompts, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return list(range(start, start + base + (self.rank < extra)))

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def gather_rows(shard: Shard, compute: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Run `compute()` on every rank and gather its rows; a failure on any rank is raised on all of them.

    Every rank reaches the gather even when its own part failed, so no rank is left
    waiting in a collective for one that died.
    """
    try:
        part, failure = compute(), None
    except Exception as err:  # noqa: BLE001 - passed on to every rank below, then raised
        if shard.world_size == 1:
            raise
        part, failure = [], (type(err).__name__, str(err))
    gathered = shard.gather((part, failure))
    failures = [(rank, f) for rank, (_, f) in enumerate(gathered) if f is not None]
    if failures:
        rank, (name, message) = failures[0]
        raise _SHARED_ERRORS.get(name, RuntimeError)(f"{message} (on rank {rank} of {shard.world_size})")
    return [row for rows, _ in gathered for row in rows]


def single_process_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of one probe call in the engine's order: deepest block first, then mask, then prompt."""
    return sorted(rows, key=lambda r: (-r["block"], r["mask"], r["prompt_index"]))
