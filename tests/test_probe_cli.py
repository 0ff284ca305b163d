"""probe.py end to end: outputs and their schema, W&B curves, checkpoint directories, ProbeCallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmrep.cli import main as train_main
from tests.wandb_records import read_offline_history
from lmrep.probe_cli import main as probe_main
from lmrep.runs import read_results
from tests.conftest import tiny_config

ROW_FIELDS = {"step", "block", "mask", "context", "free", "prompt_index", "prompt", "target_ids", "recovered_ids",
              "recovered_text", "self_acc", "nonself_acc", "self_topk_acc", "nonself_topk_acc", "exact", "final_loss",
              "distance_ratio", "method", "loss_fn", "optimizer", "lr", "steps", "settings_id", "checkpoint"}
PROMPTS = ["Once upon a time, there was a little dog.", "Lily liked to play in the park with her ball.",
           "The sun was hot, so Tom went to swim."]


@pytest.fixture()
def prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def test_untrained_probe_writes_every_output(tmp_path: Path, data_cache: Path, prompt_file: Path) -> None:
    config = tiny_config(tmp_path / "flat.yaml", "flat", tmp_path / "run", data_cache, steps=1, every=1, d=64)
    out = tmp_path / "probe"
    code = probe_main(["--init", str(config), "--seed", "0", "--prompts", str(prompt_file), "--mask", "0,1",
                       "--context", "prompt,padded", "--steps", "150", "--out", str(out)])
    assert code == 0
    for name in ("results.jsonl", "summary.csv", "summary.json", "report.html", "curves_prompt.png",
                 "curves_padded.png", "heatmap_prompt.png", "heatmap_padded.png"):
        assert (out / name).stat().st_size > 0, name
    rows = read_results(out)
    assert len(rows) == 2 * 2 * len(PROMPTS) * 2  # blocks x masks x prompts x contexts
    for row in rows:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert (row["nonself_acc"] is None) == (row["mask"] == 0)
        assert len(row["recovered_ids"]) == len(row["target_ids"])
        assert row["loss_fn"] == "l1" and isinstance(row["final_loss"], float)
    block1_self = [r["self_acc"] for r in rows if r["block"] == 1 and r["mask"] == 0]
    assert min(block1_self) == 1.0  # an untrained d=64 flat mixer inverts exactly at block 1
    summary = json.loads((out / "summary.json").read_text())
    assert {(s["block"], s["mask"], s["context"]) for s in summary} == {
        (b, m, c) for b in (1, 2) for m in (0, 1) for c in ("prompt", "padded")}
    html = (out / "report.html").read_text()
    assert "class=\"ok\"" in html and "padded" in html

    history = read_offline_history(out)
    keys = set().union(*history)
    for context in ("prompt", "padded"):
        for block in (1, 2):
            assert f"probe/{context}/self/m0/block_{block}" in keys
            assert f"probe/{context}/nonself/m1/block_{block}" in keys
    assert any(row.get("train_step") == 0 for row in history)


def test_probe_checkpoint_directory_resumes_and_refuses_mixing(tmp_path: Path, data_cache: Path,
                                                                prompt_file: Path) -> None:
    run = tmp_path / "run"
    train_main(["fit", "--config", str(tiny_config(tmp_path / "t.yaml", "flat", run, data_cache, steps=4, every=2))])
    out = tmp_path / "probe"
    args = ["--checkpoint", str(run / "checkpoints"), "--prompts", str(prompt_file), "--mask", "0,1",
            "--out", str(out), "--no-wandb"]
    assert probe_main([*args, "--steps", "30"]) == 0
    rows = read_results(out)
    assert sorted({r["step"] for r in rows}) == [0, 2, 4]
    before = (out / "results.jsonl").read_text()

    assert probe_main([*args, "--steps", "30"]) == 0  # nothing left to do: the same rows
    assert (out / "results.jsonl").read_text() == before

    assert probe_main([*args, "--steps", "31"]) == 2  # other settings: refused, nothing mixed
    assert (out / "results.jsonl").read_text() == before


def test_probe_callback_logs_into_the_training_run(tmp_path: Path, data_cache: Path) -> None:
    run = tmp_path / "run"
    callback = {"class_path": "lmrep.callbacks.ProbeCallback",
                "init_args": {"num_prompts": 2, "tokens": 8, "masks": [0, 1], "contexts": ["prompt"],
                                 "settings": {"steps": 20}}}
    config = tiny_config(tmp_path / "p.yaml", "flat", run, data_cache, steps=4, every=2, callbacks=[callback])
    train_main(["fit", "--config", str(config)])
    rows = read_results(run / "probe")
    assert sorted({r["step"] for r in rows}) == [0, 2, 4]
    assert (run / "probe" / "report.html").exists() and (run / "probe" / "curves_prompt.png").exists()
    history = read_offline_history(run)
    probe_steps = sorted(r["trainer/global_step"] for r in history if "probe/prompt/self/m0/block_1" in r)
    assert probe_steps == [0, 2, 4]
    assert any("train/loss" in r for r in history)  # loss and invertibility in one run


def test_init_takes_any_model_field_and_a_yaml_probe_config(tmp_path: Path, data_cache: Path,
                                                            prompt_file: Path) -> None:
    config = tiny_config(tmp_path / "flat.yaml", "flat", tmp_path / "run", data_cache, steps=1, every=1, d=32)
    common = ["--prompts", str(prompt_file), "--mask", "0", "--steps", "5", "--no-wandb"]
    assert probe_main(["--init", str(config), "--model.d_model", "48", "--model.n_blocks", "3", *common,
                       "--out", str(tmp_path / "a")]) == 0
    rows = read_results(tmp_path / "a")
    assert sorted({r["block"] for r in rows}) == [1, 2, 3]  # blocks: all of the overridden depth
    probe_yaml = tmp_path / "probe.yaml"
    probe_yaml.write_text(f"init: {config}\nmodel:\n  d_model: 48\n  n_blocks: 3\nblocks: 1,3\ntop_k: 2\n")
    assert probe_main(["--config", str(probe_yaml), *common, "--out", str(tmp_path / "b")]) == 0
    rows_b = read_results(tmp_path / "b")
    assert sorted({r["block"] for r in rows_b}) == [1, 3] and rows_b[0]["top_k"] == 2
    same = {(r["block"], r["prompt_index"]): r["recovered_ids"] for r in rows if r["block"] in (1, 3)}
    assert {(r["block"], r["prompt_index"]): r["recovered_ids"] for r in rows_b} == same  # the same model
    assert rows_b[0]["source_id"] == rows[0]["source_id"]


def test_help_is_the_settings_docstrings(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        probe_main(["--help"])
    text = capsys.readouterr().out
    assert "Candidates per position for top-k recovery" in text and "--loss_fn" in text and "--num_prompts" in text


def test_the_shipped_probe_configs_parse() -> None:
    from lmrep.probe_cli import parse
    from tests.conftest import REPO

    for path in sorted((REPO / "configs" / "probes").glob("*.yaml")):
        command = parse(["--config", str(path), "--out", "unused"])
        assert command.request.init and command.model_config, path


def test_block_zero_probes_the_embedding_itself(tmp_path: Path, data_cache: Path, prompt_file: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """`--blocks 0` (documented in --help and the README) inverts the embedding: every token comes back."""
    config = tiny_config(tmp_path / "flat.yaml", "flat", tmp_path / "run", data_cache, steps=1, every=1, d=64)
    out = tmp_path / "probe"
    assert probe_main(["--init", str(config), "--prompts", str(prompt_file), "--blocks", "0", "--mask", "0",
                       "--context", "prompt", "--steps", "150", "--no-wandb", "--out", str(out)]) == 0
    rows = read_results(out)
    assert {row["block"] for row in rows} == {0} and len(rows) == len(PROMPTS)
    assert all(row["self_acc"] == 1.0 and row["recovered_ids"] == row["target_ids"] for row in rows)
    with pytest.raises(SystemExit):
        probe_main(["--help"])
    assert "(0 is the embedding" in " ".join(capsys.readouterr().out.split())
