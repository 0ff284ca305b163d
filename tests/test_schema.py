"""The result schema: one declaration per column reaches results, summary, report and W&B."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmrep import schema
from lmrep.metrics import summarize
from lmrep.probe import ProbeSettings, probe
from lmrep.report import summary_fields, write_report
from lmrep.runs import settings_id
from lmrep.prompts import PromptSet
from models import MaskedMixer, MixerConfig

PAD = 1


def _rows(n_prompts: int = 2) -> list[dict]:
    torch.manual_seed(0)
    model = MaskedMixer(MixerConfig(vocab_size=64, d_model=16, n_blocks=2, context_length=8))
    ids = torch.randint(2, 64, (n_prompts, 6), generator=torch.Generator().manual_seed(0))
    result = probe(model, ids, blocks=[1, 2], masks=[0, 1], pad_token_id=PAD,
                   settings=ProbeSettings(lr=0.05, steps=5))
    rows = result.rows()
    for row in rows:  # what a run adds; the report reads these
        row.update(step=0, checkpoint="init", family="mixer", prompt="p", settings_id="x",
                   target_tokens=["a"] * len(row["target_ids"]), recovered_tokens=["a"] * len(row["target_ids"]))
    return rows


def test_a_column_declared_once_reaches_results_summary_and_report(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    missed = schema.Column(
        "self_missed", "int", "visible positions not recovered", schema.DERIVED, reduce=schema.total("self_missed"),
        derive=lambda v: v["n_self"] - v["self_correct"], report=True)
    monkeypatch.setattr(schema, "COLUMNS", (*schema.COLUMNS, missed))
    rows = _rows()
    assert all(row["self_missed"] == row["n_self"] - row["self_correct"] for row in rows)
    summary = summarize(rows, keys=("step", "block", "mask", "context"))
    for cell in summary:
        members = [r for r in rows if (r["block"], r["mask"]) == (cell["block"], cell["mask"])]
        assert cell["self_missed"] == sum(r["self_missed"] for r in members)
    assert "self_missed" in summary_fields(report_only=True)
    write_report(rows, tmp_path)
    assert "self_missed" in (tmp_path / "summary.csv").read_text().splitlines()[0]
    assert "<th>self_missed</th>" in (tmp_path / "report.html").read_text()


def test_summary_of_rows_missing_a_column_does_not_fail() -> None:
    rows = _rows()
    for row in rows:
        del row["steps_run"], row["distance_ratio"]
    summary = summarize(rows)
    assert all(cell["steps_run"] is None and cell["ratio_below_1"] is None for cell in summary)
    assert all(cell["self_acc"] is not None for cell in summary)


def test_the_schema_version_is_part_of_the_settings_id(monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = PromptSet(ids=torch.ones(1, 3, dtype=torch.long), lengths=torch.tensor([3]), texts=["a"])
    before = settings_id(ProbeSettings(), prompts)
    monkeypatch.setattr(schema, "SCHEMA_VERSION", schema.SCHEMA_VERSION + 1)
    assert settings_id(ProbeSettings(), prompts) != before


def test_every_engine_column_is_in_the_rows() -> None:
    rows = _rows(1)
    engine = {c.name for c in schema.COLUMNS if c.source in (schema.ENGINE, schema.DERIVED)}
    assert engine <= set(rows[0])
    assert {c.name for c in schema.COLUMNS if c.source == schema.SUMMARY}.isdisjoint(rows[0])

