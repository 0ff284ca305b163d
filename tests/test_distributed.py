"""Scaling out on Lightning's own engine: DDP training and sharded probing give the numbers of one process.

Two CPU processes with gloo, started the way a user starts them (`train.py ...
--trainer.strategy ddp --trainer.devices 2`, `probe.py ... --devices 2`), against
one process doing the same work in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from lmrep.checkpoints import load_checkpoint, read_checkpoint
from lmrep.cli import main as train_main
from lmrep.loggers import RUN_ID_FILE
from tests.wandb_records import read_offline_history
from lmrep.probe_cli import main as probe_main
from lmrep.runs import RESULTS_FILE, read_results
from tests.conftest import REPO, tiny_config

WORLD = 2  # processes of the distributed runs
GLOBAL_BATCH = 8  # rows per optimiser step in both runs: 1 x 8 and 2 x 4
STEPS = 6
# The flat mixer's token-mixing bias adds a per-position constant across features, which every
# following LayerNorm removes: its gradient is zero in exact arithmetic (~1e-9 here), and Adam
# turns that rounding noise into lr-sized steps whose sign depends on the summation order.
# It has no effect on any output, so it is compared through the logits instead.
NO_EFFECT_PARAMETERS = (".mix.mix.bias",)
FLOAT_FIELDS = {"final_loss", "distance_ratio"}  # probe result fields that are optimisation outputs
SUBPROCESS_TIMEOUT_S = 600  # a hang (a rank waiting in a collective) fails the test instead of blocking CI
PROMPTS = ["Once upon a time, there was a little dog.", "Lily liked to play in the park with her ball.",
           "The sun was hot, so Tom went to swim.", "A big red bird sat on the tree and sang.",
           "Mom made a cake for the party."]  # 5 prompts: 3 + 2, an uneven split


class RecordGlobalLoss(L.Callback):
    """On rank 0, appends each step's loss averaged over all ranks and the rows of the global batch."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")  # every rank takes part
        rows = trainer.strategy.all_gather(batch["input_ids"]).reshape(-1, batch["input_ids"].shape[-1])
        if trainer.is_global_zero:
            record = {"step": trainer.global_step, "loss": float(loss), "rows": sorted(map(str, rows.tolist()))}
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_command(args: list[str]) -> float:
    """Run a repository script in a subprocess like a user would; its wall time in seconds."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=os.environ.copy(), capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return time.perf_counter() - start


def training_config(tmp_path: Path, name: str, cache: Path, *, batch_size: int,
                    callbacks: list[dict[str, Any]]) -> Path:
    """A tiny packed flat-mixer run: every row holds the same number of counted tokens."""
    path = tiny_config(tmp_path / f"{name}.yaml", "flat", tmp_path / name, cache, steps=STEPS, every=2,
                       val_every=3, batch_size=batch_size, callbacks=callbacks)
    cfg = yaml.safe_load(path.read_text())
    assert cfg["data"]["packing"] is True  # per-rank means average to the global mean only with equal counts
    cfg["trainer"]["check_val_every_n_epoch"] = None
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_ddp_training_matches_one_process(tmp_path: Path, data_cache: Path) -> None:
    record = "tests.test_distributed.RecordGlobalLoss"
    single_cfg = training_config(tmp_path, "single", data_cache, batch_size=GLOBAL_BATCH,
                                 callbacks=[{"class_path": record, "init_args": {"path": str(tmp_path / "single.jsonl")}}])
    probe_cb = {"class_path": "lmrep.callbacks.ProbeCallback",
                "init_args": {"num_prompts": 2, "tokens": 8, "masks": [0, 1], "contexts": ["prompt"],
                              "settings": {"steps": 20}}}
    ddp_cfg = training_config(tmp_path, "ddp", data_cache, batch_size=GLOBAL_BATCH // WORLD,
                              callbacks=[{"class_path": record, "init_args": {"path": str(tmp_path / "ddp.jsonl")}},
                                         probe_cb])
    start = time.perf_counter()
    train_main(["fit", "--config", str(single_cfg), "--trainer.accelerator", "cpu", "--trainer.devices", "1"])
    single_s = time.perf_counter() - start
    ddp_s = run_command(["train.py", "fit", "--config", str(ddp_cfg), "--trainer.strategy", "ddp",
                         "--trainer.devices", str(WORLD), "--trainer.accelerator", "cpu"])
    print(f"\ntraining wall time: 1 process {single_s:.1f}s (in-process), {WORLD} processes {ddp_s:.1f}s (subprocess)")

    # the same global batches, and the same loss at every step
    single, ddp = read_records(tmp_path / "single.jsonl"), read_records(tmp_path / "ddp.jsonl")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == list(range(1, STEPS + 1))
    for a, b in zip(single, ddp):
        assert a["rows"] == b["rows"], f"step {a['step']}: the {WORLD} shards are not the 1-process batch"
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), a["step"]

    # one set of checkpoints, with the same weights
    names = ["last.ckpt", "step=000000.ckpt", "step=000002.ckpt", "step=000004.ckpt", "step=000006.ckpt"]
    for run in ("single", "ddp"):
        assert sorted(p.name for p in (tmp_path / run / "checkpoints").iterdir()) == names, run
    for name in names:
        a = read_checkpoint(tmp_path / "single" / "checkpoints" / name)
        b = read_checkpoint(tmp_path / "ddp" / "checkpoints" / name)
        assert a["lmrep"]["step"] == b["lmrep"]["step"]
        for key, value in a["state_dict"].items():
            if not key.endswith(NO_EFFECT_PARAMETERS):
                torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
    ids = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        single_logits = load_checkpoint(tmp_path / "single" / "checkpoints" / "last.ckpt").model(ids)
        ddp_logits = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.ckpt").model(ids)
    torch.testing.assert_close(ddp_logits, single_logits, rtol=1e-4, atol=1e-4)

    # one W&B run holding the exact (all-rank) validation loss of the 1-process run
    ddp_run = tmp_path / "ddp"
    assert len(list((ddp_run / "wandb").glob("offline-run-*"))) == 1
    run_id = (ddp_run / RUN_ID_FILE).read_text().strip()
    assert list((ddp_run / "wandb").glob(f"offline-run-*-{run_id}"))

    def val_losses(run: Path) -> dict[int, float]:
        return {r["trainer/global_step"]: r["val/loss"] for r in read_offline_history(run) if "val/loss" in r}

    def train_losses(run: Path) -> dict[int, float]:
        return {r["trainer/global_step"]: r["train/loss"] for r in read_offline_history(run) if "train/loss" in r}

    expected = train_losses(tmp_path / "single")  # the logged curve is the global batch's, not rank 0's shard
    assert len(expected) == STEPS
    assert train_losses(ddp_run) == pytest.approx(expected, rel=1e-5)
    expected = val_losses(tmp_path / "single")
    assert sorted(expected) == list(range(0, STEPS + 1, 3))  # step 0 (before any update) too
    assert val_losses(ddp_run) == pytest.approx(expected, rel=1e-5)

    # the in-training probe ran on rank 0 at step 0 and at checkpoint steps without a hang
    assert sorted({r["step"] for r in read_results(ddp_run / "probe")}) == [0, 2, 4, 6]


@pytest.mark.slow
def test_sharded_probe_writes_what_one_process_writes(tmp_path: Path, data_cache: Path) -> None:
    config = tiny_config(tmp_path / "flat.yaml", "flat", tmp_path / "run", data_cache, steps=1, every=1, d=64)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["--init", str(config), "--seed", "3", "--prompts", str(prompts), "--mask", "0,1",
            "--context", "prompt,padded", "--steps", "60", "--no-wandb"]
    start = time.perf_counter()
    assert probe_main([*args, "--out", str(tmp_path / "single")]) == 0
    single_s = time.perf_counter() - start
    sharded_s = run_command(["probe.py", *args, "--out", str(tmp_path / "sharded"), "--devices", str(WORLD),
                             "--accelerator", "cpu"])
    print(f"\nprobe wall time: 1 process {single_s:.1f}s (in-process), {WORLD} processes {sharded_s:.1f}s (subprocess)")

    single, sharded = read_results(tmp_path / "single"), read_results(tmp_path / "sharded")
    assert len(single) == 2 * 2 * len(PROMPTS) * 2  # blocks x masks x prompts x contexts
    key = ("context", "block", "mask", "prompt_index")
    # rank 0 writes the rows in the single-process order
    assert [tuple(r[k] for k in key) for r in sharded] == [tuple(r[k] for k in key) for r in single]
    for a, b in zip(single, sharded):
        assert set(a) == set(b)
        # Decoded tokens, accuracies and counts are the same. Floats are the same in exact
        # arithmetic; a BLAS may pick other kernels for another batch shape or thread count, so
        # they are compared to rounding (on the machine this was written on they are bitwise equal).
        for field in sorted(set(a) - FLOAT_FIELDS - {"topk_ids"}):
            assert b[field] == a[field], (field, [a[k] for k in key])
        for field in FLOAT_FIELDS:
            assert b[field] == pytest.approx(a[field], rel=1e-4, abs=1e-7), (field, [a[k] for k in key])
        assert [ids[0] for ids in b["topk_ids"]] == a["recovered_ids"]
    summary = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("single", "sharded")]
    assert len(summary[0]) == len(summary[1]) == 2 * 2 * 2
    for a, b in zip(*summary):
        for field, value in a.items():
            assert b[field] == (value if "acc" in field or not isinstance(value, float)
                                else pytest.approx(value, rel=1e-4)), field
    assert (tmp_path / "sharded" / "report.html").exists()

    # re-running sharded skips finished work and leaves the file as it is
    before = (tmp_path / "sharded" / RESULTS_FILE).read_bytes()
    run_command(["probe.py", *args, "--out", str(tmp_path / "sharded"), "--devices", str(WORLD)])
    assert (tmp_path / "sharded" / RESULTS_FILE).read_bytes() == before


def test_several_devices_need_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Lightning starts the other ranks by re-running sys.argv: from inside pytest that would be pytest.
    code = probe_main(["--init", "configs/quickstart.yaml", "--devices", "2", "--out", str(tmp_path)])
    assert code == 2
    assert "run as a command" in capsys.readouterr().err
    assert not (tmp_path / RESULTS_FILE).exists()
