"""`ProbeResult`: the per-row tensors of one probe call, and their plain rows (`lmrep.schema`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lmrep import schema
from lmrep.probe.settings import ProbeSettings


@dataclass
class ProbeResult:
    """Per-row results of one probe; row r is (block[r], mask[r], prompt_index[r]).

    `values` holds one tensor per engine column of the schema (and any solver
    extras), first dimension R; they read as attributes (`result.self_acc`).
    Token tensors cover the prompt's T positions; `real_mask` marks the real
    (non-padding) ones, over which every accuracy is taken.
    """

    values: dict[str, Tensor]
    real_mask: Tensor  # (R, T) bool
    settings: ProbeSettings = field(default_factory=ProbeSettings)  # resolved

    def __getattr__(self, name: str) -> Tensor:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"{type(self).__name__} has no column {name!r}")

    def rows(self) -> list[dict[str, Any]]:
        """One dict of plain Python values per row: the schema's engine, solver and derived columns, then the settings."""
        record = self.settings.as_record()
        values = self.values
        engine_columns = [c for c in schema.COLUMNS if c.source in (schema.ENGINE, schema.SOLVER, schema.DERIVED)
                          and c.name in values]
        out = []
        for r in range(self.real_mask.shape[0]):
            n_real = int(values["n_real"][r])
            row = {c.name: schema.plain_value(values[c.name][r], c.kind, n_real) for c in engine_columns}
            row.update(record)
            out.append(row)
        return out
