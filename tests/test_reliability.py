"""Reliability and security: bad input gets one clear line, faults lose nothing, checkpoints run no code.

Tiny models on the shared TinyStories copy. The training side is driven through
`lmrep.cli.main` in-process and, where the user's experience is the point
(one line on stderr, exit code, SIGKILL), through `python train.py` in a subprocess.
"""

from __future__ import annotations

import hashlib
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.trainer.connectors.data_connector import _DataConnector
from torch.utils.data import DistributedSampler

import data.tinystories as tinystories
from data.tinystories import EpochSampler, ResumableLoader, TinyStoriesDataModule
from lmrep.checkpoints import (
    CheckpointError,
    SafeCheckpointIO,
    StepCheckpoint,
    load_checkpoint,
    read_checkpoint,
)
from lmrep.cli import TrainCLI, main
from lmrep.loggers import RUN_ID_FILE
from lmrep.module import LanguageModelModule
from lmrep.probe_cli import main as probe_main
from lmrep.prompts import encode_prompts
from lmrep.runs import RESULTS_FILE, read_results
from tests.conftest import REPO, tiny_config
from tests.wandb_records import read_offline_history

EPOCH_STORIES = 8  # training stories: a handful of batches per epoch, so runs cross epoch boundaries
STEP0 = "step=000000.ckpt"


# ---- helpers -------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests check the user's one-line errors, so a debugging LMREP_DEBUG=1 must not leak in."""
    monkeypatch.delenv("LMREP_DEBUG", raising=False)


class StopAtStep(L.Callback):
    """Ends training after `step` optimiser steps, as an interruption would (after that step's checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class SlowSteps(L.Callback):
    """Makes every step take a while, so a subprocess can be killed mid-run."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: Any) -> None:
        time.sleep(self.seconds)


class PoisonWeights(L.Callback):
    """Writes NaN into the embedding at a given step: at its start (the loss sees it) or its end."""

    def __init__(self, step: int, at: str = "start") -> None:
        self.step, self.at = step, at

    def _poison(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.model.parameters()).fill_(float("nan"))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.at == "start":
            self._poison(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.at == "end":
            self._poison(trainer, pl_module)


def callback(cls: type, **init_args: Any) -> dict[str, Any]:
    return {"class_path": f"tests.test_reliability.{cls.__name__}", "init_args": init_args}


def config(path: Path, run: Path, cache: Path, *, steps: int, every: int, family: str = "flat",
           callbacks: list[dict[str, Any]] | None = None, model: dict[str, Any] | None = None,
           data: dict[str, Any] | None = None, lr: float | None = None) -> Path:
    """A tiny config (tests.conftest.tiny_config) on a short epoch, with overrides."""
    tiny_config(path, family, run, cache, steps=steps, every=every, callbacks=callbacks)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["max_train_stories"] = EPOCH_STORIES
    cfg["data"].update(data or {})
    cfg["model"]["model"]["init_args"]["config"].update(model or {})
    cfg["trainer"]["val_check_interval"] = 1000  # no validation: these tests are about training state
    if lr is not None:
        cfg["model"]["lr"] = lr
    path.write_text(yaml.safe_dump(cfg))
    return path


def fails(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run train.py's main in-process; it must exit non-zero with one `error:` line. Returns that line."""
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def fit_from(checkpoint: Path, tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture) -> tuple[Path, Path, str]:
    """A fresh tiny run given `--ckpt_path checkpoint`, which must fail: its run folder, config and error line."""
    run = tmp_path / "run"
    cfg = config(tmp_path / "c.yaml", run, cache, steps=2, every=2)
    return run, cfg, fails(["fit", "--config", str(cfg), "--ckpt_path", str(checkpoint)], capsys)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def train_losses(run: Path) -> dict[int, float]:
    """train/loss per step from the offline W&B files of a run (a resumed step keeps its last value)."""
    return {row["trainer/global_step"]: row["train/loss"] for row in read_offline_history(run) if "train/loss" in row}


def evil_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint-named file whose unpickling would create `marker` (written with plain torch.save)."""

    class Payload:
        def __reduce__(self) -> tuple:
            return (pathlib.Path.touch, (marker,))

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "lmrep": Payload(), "epoch": 0, "global_step": 4}, path)
    return path


def run_train(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """`python train.py ...` from the repository root, as a user runs it."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}
    env.pop("LMREP_DEBUG", None)
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Path:
    """The checkpoint directory of one tiny finished run (steps 0, 2, 4, 6 and last)."""
    root = tmp_path_factory.mktemp("trained")
    main(["fit", "--config", str(config(root / "c.yaml", root / "run", data_cache, steps=6, every=2))])
    return root / "run" / "checkpoints"


# ---- safe loading ------------------------------------------------------------------------------


def test_crafted_checkpoint_runs_no_code(tmp_path: Path, data_cache: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "PWNED"
    # the payload is real: an unsafe load runs it
    torch.load(evil_checkpoint(tmp_path / "proof.ckpt", marker), weights_only=False)
    assert marker.exists()
    marker.unlink()

    evil = evil_checkpoint(tmp_path / "evil.ckpt", marker)
    expected = (f"refusing to load checkpoint {evil}: it holds pickled code, not only weights "
                "(it asks to call getattr); lmrep loads checkpoints with weights_only=True")
    for load in (load_checkpoint, read_checkpoint, SafeCheckpointIO().load_checkpoint):
        with pytest.raises(CheckpointError) as info:
            load(evil)
        assert str(info.value) == expected
    # explicit resume, and auto-resume where a run's last.ckpt was replaced by the crafted file
    run, cfg, error = fit_from(evil, tmp_path, data_cache, capsys)
    assert error == f"error: {expected}"
    last = evil_checkpoint(run / "checkpoints" / "last.ckpt", marker)
    assert fails(["fit", "--config", str(cfg)], capsys) == f"error: {expected.replace(str(evil), str(last))}"
    assert not marker.exists()
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoints", "last.ckpt"]  # nothing else written


def test_weights_only_cannot_be_turned_off(tmp_path: Path, data_cache: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = config(tmp_path / "c.yaml", tmp_path / "run", data_cache, steps=2, every=2)
    line = fails(["fit", "--config", str(cfg), "--weights_only", "false"], capsys)
    assert line == "error: weights_only=false is not supported: lmrep never loads pickled code from checkpoints"
    assert not (tmp_path / "run").exists()


def test_cli_installs_safe_checkpoint_io(tmp_path: Path, data_cache: Path) -> None:
    cfg = config(tmp_path / "c.yaml", tmp_path / "run", data_cache, steps=2, every=2)
    cli = TrainCLI(LanguageModelModule, TinyStoriesDataModule, args=["--config", str(cfg)], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, SafeCheckpointIO)


# ---- atomic checkpoint writes ------------------------------------------------------------------


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "ckpts" / "step=000002.ckpt"
    io = SafeCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    before = sha(target)
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    real_save = torch.save

    def dies_midway(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")  # bytes reach the file, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, target)  # overwrite fails
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, tmp_path / "ckpts" / "last.ckpt")  # new file
    monkeypatch.setattr(torch, "save", real_save)
    assert sha(target) == before  # the old complete file is untouched
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no partial file, no temp left


# ---- resumable data order ----------------------------------------------------------------------


def test_loader_resumes_mid_epoch_and_at_epoch_end() -> None:
    data = torch.arange(23)
    straight = ResumableLoader(data, batch_size=4, seed=3, collate_fn=torch.stack)
    epoch0 = [b.tolist() for b in straight]
    straight.sampler.set_epoch(1)
    epoch1 = [b.tolist() for b in straight]
    assert sorted(sum(epoch0, [])) == list(range(23)) and epoch0 != epoch1  # a permutation per epoch

    loader = ResumableLoader(data, batch_size=4, seed=3, collate_fn=torch.stack)
    assert loader.state_dict() == {"epoch": 0, "samples": 0}
    it = iter(loader)
    seen = [next(it).tolist() for _ in range(2)]
    state = loader.state_dict()
    assert state == {"epoch": 0, "samples": 8}
    resumed = ResumableLoader(data, batch_size=4, seed=3, collate_fn=torch.stack)
    resumed.load_state_dict(state)
    assert seen + [b.tolist() for b in resumed] == epoch0
    assert resumed.state_dict() == {"epoch": 0, "samples": 23}
    # a checkpoint at an epoch's end: the next epoch starts from its first batch
    at_end = ResumableLoader(data, batch_size=4, seed=3, collate_fn=torch.stack)
    at_end.load_state_dict({"epoch": 0, "samples": 23})
    at_end.sampler.set_epoch(1)
    assert [b.tolist() for b in at_end] == epoch1


def test_sampler_shards_by_rank_and_lightning_keeps_it(monkeypatch: pytest.MonkeyPatch) -> None:
    data = torch.arange(10)
    single = list(EpochSampler(data, seed=0))
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(tinystories, "_world", lambda rank=rank: (2, rank))
        shards.append(list(EpochSampler(data, seed=0)))
    assert shards[0] == single[0::2] and shards[1] == single[1::2]
    # Lightning injects its own DistributedSampler only where the loader's is not one
    trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, logger=False)
    loader = ResumableLoader(data, batch_size=2, seed=0, collate_fn=torch.stack)
    assert isinstance(loader.sampler, DistributedSampler)
    assert not _DataConnector(trainer)._requires_distributed_sampler(loader)


@pytest.mark.slow
def test_resumed_run_ends_with_identical_weights(tmp_path: Path, data_cache: Path,
                                                 monkeypatch: pytest.MonkeyPatch, recwarn: Any) -> None:
    steps, stop, every = 14, 8, 4  # ~6 batches an epoch: the stop is mid-epoch, the runs cross epochs
    straight = tmp_path / "straight"
    main(["fit", "--config", str(config(tmp_path / "a.yaml", straight, data_cache, steps=steps, every=every))])

    run = tmp_path / "resumed"
    cfg = config(tmp_path / "b.yaml", run, data_cache, steps=steps, every=every)
    interrupted = config(tmp_path / "b0.yaml", run, data_cache, steps=steps, every=every,
                         callbacks=[callback(StopAtStep, step=stop)])
    main(["fit", "--config", str(interrupted)])
    ckpts = run / "checkpoints"
    assert load_checkpoint(ckpts / "last.ckpt").step == stop
    step0 = sha(ckpts / STEP0)

    loads: list[Any] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    main(["fit", "--config", str(cfg)])  # the same command, auto-resumed from last.ckpt
    monkeypatch.setattr(torch, "load", real_load)

    assert loads and all(w is True for w in loads)  # Lightning's resume path loaded weights-only
    assert not [w for w in recwarn if "not resumable" in str(w.message)]
    assert sha(ckpts / STEP0) == step0
    assert load_checkpoint(ckpts / "last.ckpt").step == steps
    assert_same_weights(straight / "checkpoints" / "last.ckpt", ckpts / "last.ckpt")
    assert train_losses(straight) == train_losses(run)


# ---- determinism -------------------------------------------------------------------------------


def test_same_seed_same_losses_and_weights(tmp_path: Path, data_cache: Path) -> None:
    runs = [tmp_path / "one", tmp_path / "two"]
    for i, run in enumerate(runs):
        main(["fit", "--config", str(config(tmp_path / f"{i}.yaml", run, data_cache, steps=5, every=5))])
    losses = [train_losses(run) for run in runs]
    assert set(losses[0]) == set(range(5)) and all(math.isfinite(v) for v in losses[0].values())
    assert losses[0] == losses[1]
    assert_same_weights(*(run / "checkpoints" / "last.ckpt" for run in runs))


# ---- SIGKILL, then the same command again ------------------------------------------------------


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (e.g. the W&B service a training run starts)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _sigkill_when_written(argv: list[str], env: dict[str, str], path: Path, stderr: Path, *,
                          poll: float) -> list[int]:
    """Run `python argv` in the repo, SIGKILL it once `path` exists; the pids of its children at that moment.

    Its stderr goes to a file (a pipe nobody reads could fill and stall it) and is shown if it
    ends on its own first.
    """
    with stderr.open("w") as err:
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 240
            while not path.exists():
                assert proc.poll() is None, f"{argv[0]} ended before it could be killed:\n{stderr.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no {path.name} in time"
                time.sleep(poll)
            children = _children(proc.pid)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return children


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path: Path, data_cache: Path) -> None:
    steps, every = 12, 2
    run = tmp_path / "run"
    cfg = config(tmp_path / "c.yaml", run, data_cache, steps=steps, every=every,
                 callbacks=[callback(SlowSteps, seconds=0.3)])
    ckpts = run / "checkpoints"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}
    children = _sigkill_when_written(["train.py", "fit", "--config", str(cfg)], env, ckpts / "step=000004.ckpt",
                                     tmp_path / "train.stderr", poll=0.05)
    killed_at = load_checkpoint(ckpts / "last.ckpt").step
    assert 2 <= killed_at < steps  # last.ckpt follows step=000004.ckpt: the kill may fall between
    step0 = sha(ckpts / STEP0)
    run_id = (run / RUN_ID_FILE).read_text().strip()

    again = run_train(["fit", "--config", str(cfg)])
    for pid in children:  # the killed run's W&B service, if it outlived its parent
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {ckpts / 'last.ckpt'}" in again.stderr
    assert load_checkpoint(ckpts / "last.ckpt").step == steps
    assert sha(ckpts / STEP0) == step0
    assert (run / RUN_ID_FILE).read_text().strip() == run_id
    wandb_runs = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))  # run-<id>.wandb in each run's directory
    assert len(wandb_runs) == 2 and {f.stem.split("-", 1)[1] for f in wandb_runs} == {run_id}
    losses = train_losses(run)
    assert set(range(killed_at, steps)) <= set(losses)
    assert all(math.isfinite(losses[s]) for s in range(killed_at, steps))


# ---- clear errors, one per bad input -----------------------------------------------------------


def test_unknown_config_key(tmp_path: Path, data_cache: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    cfg = config(tmp_path / "c.yaml", run, data_cache, steps=2, every=2, model={"widht": 3})
    line = fails(["fit", "--config", str(cfg)], capsys)
    assert line.startswith('error: Parser key "model.model": ') and "widht" in line
    cfg = config(tmp_path / "d.yaml", run, data_cache, steps=2, every=2)
    line = fails(["fit", "--config", str(cfg), "--trainer.max_stepz", "3"], capsys)
    assert line == "error: unrecognized arguments: --trainer.max_stepz 3"
    assert not run.exists()


def test_unknown_model_family(tmp_path: Path, data_cache: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    cfg = config(tmp_path / "c.yaml", run, data_cache, steps=2, every=2)
    line = fails(["fit", "--config", str(cfg), "--model.model.class_path", "models.mixer.Transformer"], capsys)
    assert line == ('error: Parser key "model.model": Problem with given class_path '
                    "'models.mixer.Transformer': module 'models.mixer' has no attribute 'Transformer'")
    assert not run.exists()


@pytest.mark.parametrize(("family", "values", "message"), [
    ("llama", {"d_model": 30, "n_heads": 4}, "error: d_model 30 is not divisible by n_heads 4"),
    ("expanded", {"expansion": 0}, "error: expansion must be >= 1, got 0"),
    ("flat", {"context_length": 0}, "error: context_length must be >= 1, got 0"),
    ("flat", {"mixing": "zigzag"}, "error: unknown mixing 'zigzag': choose one of flat, expanded, parallel"),
])
def test_config_values_out_of_range(family: str, values: dict[str, Any], message: str, tmp_path: Path,
                                    data_cache: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    cfg = config(tmp_path / "c.yaml", run, data_cache, steps=2, every=2, family=family, model=values)
    assert fails(["fit", "--config", str(cfg)], capsys) == message
    assert not run.exists()


def test_checkpoint_missing(tmp_path: Path, data_cache: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nowhere" / "last.ckpt"
    with pytest.raises(CheckpointError, match=f"^checkpoint not found: {missing}$"):
        load_checkpoint(missing)
    run, _, error = fit_from(missing, tmp_path, data_cache, capsys)
    assert error == f"error: checkpoint not found: {missing}"
    assert not run.exists()


@pytest.mark.parametrize("kind", ["truncated", "text", "pickle", "no metadata"])
def test_checkpoint_truncated_or_not_a_checkpoint(kind: str, trained: Path, tmp_path: Path, data_cache: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.ckpt"
    good = (trained / "last.ckpt").read_bytes()
    if kind == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    elif kind == "text":
        bad.write_text("model: llama\n")
    elif kind == "pickle":
        torch.save({"a": 1}, bad, _use_new_zipfile_serialization=False)
    else:
        torch.save({"state_dict": {"w": torch.ones(2)}}, bad)
    message = (f"{bad} is not an lmrep checkpoint (no model metadata)" if kind == "no metadata" else
               f"cannot read checkpoint {bad}: not a torch checkpoint archive (truncated, or another kind of file)")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    assert str(info.value) == message
    run, _, error = fit_from(bad, tmp_path, data_cache, capsys)
    assert error == f"error: {message}"
    assert not run.exists()


def test_checkpoint_of_another_tokenizer(trained: Path, tmp_path: Path, data_cache: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    import json

    from data.tokenizer import tokenizer_hash

    meta = read_checkpoint(trained / "last.ckpt")["lmrep"]
    saved = meta["tokenizer_hash"]
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(trained / "last.ckpt", tokenizer_hash="0123456789abcdef")
    assert str(info.value) == (f"{trained / 'last.ckpt'} was trained with tokenizer {saved}, not the given "
                               "tokenizer 0123456789abcdef: use the tokenizer stored in the checkpoint")

    # another tokenizer of the same size: two ordinary tokens swap ids
    spec = json.loads(meta["tokenizer_json"])
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    other = tmp_path / "other" / "tokenizer.json"
    other.parent.mkdir()
    other.write_text(json.dumps(spec))
    other_hash = tokenizer_hash(other)
    assert other_hash != saved

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes((trained / "last.ckpt").read_bytes())
    cfg = config(tmp_path / "c.yaml", run, data_cache, steps=4, every=2, data={"tokenizer_path": str(other)})
    assert fails(["fit", "--config", str(cfg)], capsys) == (
        f"error: {run / 'checkpoints' / 'last.ckpt'} was trained with tokenizer {saved}, but the data's tokenizer "
        f"is {other_hash}: resume with the tokenizer it was trained with (data.tokenizer_path) or start a new run_dir")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert not (run / "wandb").exists()


def test_data_folder_without_stories(tmp_path: Path, data_cache: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "stories"
    (empty / "train").mkdir(parents=True)
    (empty / "train" / "000.txt").write_text("<|endoftext|>\n\n")
    run = tmp_path / "run"
    cfg = config(tmp_path / "c.yaml", run, data_cache, steps=2, every=2, data={"data_dir": str(empty)})
    assert fails(["fit", "--config", str(cfg)], capsys) == \
        f"error: no train stories in {empty / 'train'} (expected stories separated by <|endoftext|> lines)"
    assert not (run / "checkpoints").exists() and not (run / "wandb").exists()


def test_nan_loss_names_the_step(tmp_path: Path, data_cache: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    cfg = config(tmp_path / "c.yaml", run, data_cache, steps=6, every=2,
                 callbacks=[callback(PoisonWeights, step=3, at="start")])
    assert fails(["fit", "--config", str(cfg)], capsys) == "error: training loss became nan at step 3"
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", STEP0, "step=000002.ckpt"]
    assert load_checkpoint(ckpts / "last.ckpt").step == 2  # a resume starts from good weights


def test_nan_weights_are_never_checkpointed(tmp_path: Path, data_cache: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    cfg = config(tmp_path / "c.yaml", run, data_cache, steps=6, every=2,
                 callbacks=[callback(PoisonWeights, step=4, at="end")])
    assert fails(["fit", "--config", str(cfg)], capsys) == (
        "error: weights became non-finite at step 4 (model.embedding.weight); not writing step=000004.ckpt: "
        "lower the learning rate, or resume from the last good checkpoint")
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", STEP0, "step=000002.ckpt"]
    assert load_checkpoint(ckpts / "last.ckpt").step == 2


@pytest.mark.slow
def test_user_sees_one_line_from_train_py(tmp_path: Path, data_cache: Path) -> None:
    """The real command: an absurd learning rate and a bad config value, each one stderr line, exit 2."""
    run = tmp_path / "run"
    cfg = config(tmp_path / "c.yaml", run, data_cache, steps=6, every=2, lr=1e30)
    result = run_train(["fit", "--config", str(cfg)])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(errors) == 1 and errors[0].startswith("error: training loss became ") \
        and errors[0].endswith(" at step 1"), result.stderr[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [STEP0]

    bad = run_train(["fit", "--config", str(cfg), "--run_dir", str(tmp_path / "other"),
                     "--model.model.init_args.config.d_model", "0"])
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "error: d_model must be >= 1, got 0"
    assert "Traceback" not in bad.stderr and not (tmp_path / "other").exists()

    # --debug (or LMREP_DEBUG=1) gives the traceback instead
    with pytest.raises(ValueError, match="d_model must be >= 1, got 0"):
        main(["fit", "--config", str(cfg), "--run_dir", str(tmp_path / "other"),
              "--model.model.init_args.config.d_model", "0", "--debug"])


# ---- the probe: bad input, faults, re-runs -----------------------------------------------------

PROMPTS = ["Once upon a time, there was a little dog.", "Lily liked to play in the park with her ball.",
           "The sun was hot, so Tom went to swim."]
PROBE_STEPS = "20"  # optimisation steps: these tests are about bookkeeping, not recovery


@pytest.fixture()
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def probe_args(checkpoint: Path, prompt_file: Path, out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--prompts", str(prompt_file), "--out", str(out), "--no-wandb",
            "--steps", PROBE_STEPS, "--mask", "0,1", *extra]


def probe_fails(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """probe.py's main must return 2 and print exactly one `error:` message. Returns it."""
    assert probe_main(args) == 2
    err = capsys.readouterr().err
    # the progress bar shares stderr: find the message wherever a carriage return left it
    errors = re.findall(r"error: [^\r\n]*", err)
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_probe_prompt_longer_than_context(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    long = tmp_path / "long.txt"
    long.write_text("Once upon a time " * 20 + "\n")
    out = tmp_path / "probe"
    assert probe_fails(probe_args(trained, long, out), capsys) == \
        f"error: {long}:1: prompt of 100 tokens is longer than the model's context length 32"
    assert not out.exists()


def test_probe_prompt_file_errors_name_file_and_line(trained: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """An over-long line and a line that is not UTF-8: one error line naming the file and the line."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A dog ran.\n\nThe cat sat.\n" + "Once upon a time " * 20 + "\n")
    out = tmp_path / "probe"
    assert probe_fails(probe_args(trained, prompts, out), capsys) == \
        f"error: {prompts}:4: prompt of 100 tokens is longer than the model's context length 32"
    prompts.write_bytes(b"A dog ran.\nThe caf\xe9 was open.\n")  # Latin-1, not UTF-8
    assert probe_fails(probe_args(trained, prompts, out), capsys) == \
        f"error: {prompts}:2: not valid UTF-8 (byte 0xe9 at column 8); save the prompts file as UTF-8"
    assert not out.exists()


def test_probe_empty_prompt_set(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    out = tmp_path / "probe"
    assert probe_fails(probe_args(trained, blank, out), capsys) == \
        f"error: empty prompt set: {blank} has no non-empty lines"
    args = ["--checkpoint", str(trained), "--num-prompts", "0", "--out", str(out), "--no-wandb"]
    assert probe_fails(args, capsys) == "error: --num-prompts must be >= 1, got 0"
    assert not out.exists()


def test_probe_prompt_that_tokenizes_to_nothing(trained: Path) -> None:
    tokenizer = load_checkpoint(trained / "last.ckpt").tokenizer
    # a non-empty line always gives byte-level BPE tokens, so only an empty string (or a cut to 0) gives none
    with pytest.raises(ValueError, match="^prompt 1 tokenizes to nothing: ''$"):
        encode_prompts(["A dog.", ""], tokenizer)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--blocks", "3", "error: block(s) [3] out of range: this model has blocks 0..2"),
    ("--blocks", "one", "error: blocks must be a comma-separated list of integers, got 'one'"),
    ("--mask", "40", "error: mask 40 is out of range: masks must be in 0..10 for 11-token prompts"),
    ("--mask", "-1", "error: mask -1 is out of range: masks must be in 0..10 for 11-token prompts"),
])
def test_probe_blocks_or_masks_out_of_range(option: str, value: str, message: str, trained: Path, tmp_path: Path,
                                            prompts: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "probe"
    assert probe_fails([*probe_args(trained, prompts, out), option, value], capsys) == message
    assert not (out / RESULTS_FILE).exists()


def test_probe_nan_during_inversion(trained: Path, tmp_path: Path, prompts: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "probe"
    line = probe_fails([*probe_args(trained, prompts, out), "--lr", "inf"], capsys)
    assert re.fullmatch(r"error: probing step=000000\.ckpt \(prompt context\): non-finite probe loss at step \d+, block \d, mask \d", line), line
    assert not (out / RESULTS_FILE).exists()


def test_probe_checkpoint_of_another_tokenizer(trained: Path, tmp_path: Path, prompts: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    import json

    from data.tokenizer import tokenizer_hash

    meta = read_checkpoint(trained / "last.ckpt")["lmrep"]
    spec = json.loads(meta["tokenizer_json"])
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    other = tmp_path / "tokenizer.json"
    other.write_text(json.dumps(spec))
    out = tmp_path / "probe"
    assert probe_fails([*probe_args(trained / "step=000002.ckpt", prompts, out), "--tokenizer", str(other)],
                       capsys) == (f"error: {trained / 'step=000002.ckpt'} was trained with tokenizer "
                                   f"{meta['tokenizer_hash']}, not the given tokenizer {tokenizer_hash(other)}: "
                                   "use the tokenizer stored in the checkpoint")
    assert not (out / RESULTS_FILE).exists()


def test_probe_is_deterministic(trained: Path, tmp_path: Path, prompts: Path) -> None:
    for out in ("one", "two"):
        assert probe_main(probe_args(trained / "step=000002.ckpt", prompts, tmp_path / out)) == 0
    assert (tmp_path / "one" / RESULTS_FILE).read_text() == (tmp_path / "two" / RESULTS_FILE).read_text()


def spy_on_probing(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, tuple[int, ...]]]:
    """Record (checkpoint step, blocks) of every probe the runner starts."""
    import lmrep.runs as runner

    calls: list[tuple[int, tuple[int, ...]]] = []
    real = runner.probe_rows

    def spy(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        calls.append((kwargs["step"], tuple(kwargs["blocks"])))
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "probe_rows", spy)
    return calls


def test_probe_rerun_skips_finished_work(trained: Path, tmp_path: Path, prompts: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "probe"
    ckpt = trained / "step=000002.ckpt"
    calls = spy_on_probing(monkeypatch)
    assert probe_main([*probe_args(ckpt, prompts, out), "--blocks", "1"]) == 0
    block1 = [r for r in read_results(out)]
    assert calls == [(2, (1,))]
    assert probe_main([*probe_args(ckpt, prompts, out), "--blocks", "1,2"]) == 0  # only block 2 is new
    assert calls == [(2, (1,)), (2, (2,))]
    rows = read_results(out)
    assert [r for r in rows if r["block"] == 1] == block1
    assert sorted({(r["block"], r["mask"]) for r in rows}) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert probe_main([*probe_args(ckpt, prompts, out), "--blocks", "1,2"]) == 0  # all done: nothing probed
    assert len(calls) == 2 and read_results(out) == rows


def test_probe_rerun_with_other_settings_never_mixes(trained: Path, tmp_path: Path, prompts: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "probe"
    ckpt = trained / "step=000002.ckpt"
    assert probe_main(probe_args(ckpt, prompts, out)) == 0
    before = (out / RESULTS_FILE).read_text()
    sid = read_results(out)[0]["settings_id"]
    other = tmp_path / "other.txt"
    other.write_text("A cat sat on the mat.\n")
    capsys.readouterr()
    for args in ([*probe_args(ckpt, prompts, out), "--seed", "1"], [*probe_args(ckpt, prompts, out), "--lr", "0.02"],
                 [*probe_args(ckpt, prompts, out), "--loss", "l2"], probe_args(ckpt, other, out)):
        line = probe_fails(args, capsys)
        assert line == (f"error: {out / RESULTS_FILE} holds results made with other settings ({sid}): "
                        "use another --out"), (args, line)
        assert (out / RESULTS_FILE).read_text() == before


def test_probe_rerun_on_another_model_never_mixes(tmp_path: Path, data_cache: Path, prompts: Path) -> None:
    out = tmp_path / "probe"
    flat = config(tmp_path / "flat.yaml", tmp_path / "r1", data_cache, steps=1, every=1)
    expanded = config(tmp_path / "exp.yaml", tmp_path / "r2", data_cache, steps=1, every=1, family="expanded")
    common = ["--prompts", str(prompts), "--out", str(out), "--no-wandb", "--steps", PROBE_STEPS, "--mask", "0"]
    assert probe_main(["--init", str(flat), *common]) == 0
    flat_rows = read_results(out)
    code = probe_main(["--init", str(expanded), *common])
    assert code == 2 or read_results(out) != flat_rows  # refused, or the expanded model was really probed


@pytest.mark.slow
def test_interrupted_probe_resumes(trained: Path, tmp_path: Path, prompts: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "probe"
    args = probe_args(trained, prompts, out)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    # results.jsonl is written atomically after each checkpoint: kill as soon as the first is there
    _sigkill_when_written(["probe.py", *args], env, out / RESULTS_FILE, tmp_path / "probe.stderr", poll=0.02)
    done = read_results(out)
    done_steps = {r["step"] for r in done}
    all_steps = {0, 2, 4, 6}
    assert done_steps and done_steps < all_steps

    calls = spy_on_probing(monkeypatch)
    assert probe_main(args) == 0
    assert sorted(step for step, _ in calls) == sorted(all_steps - done_steps)  # finished checkpoints skipped
    rows = read_results(out)
    assert [r for r in rows if r["step"] in done_steps] == done
    assert {(r["step"], r["block"], r["mask"], r["prompt_index"]) for r in rows} == {
        (s, b, m, p) for s in all_steps for b in (1, 2) for m in (0, 1) for p in range(len(PROMPTS))}


# ---- the probe: output folders, damaged results, interrupts, prompt options (issue 13) ----------

def test_probe_refuses_a_directory_of_two_models(trained: Path, tmp_path: Path, prompts: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    from lmrep.checkpoints import atomic_torch_save

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / STEP0).write_bytes((trained / STEP0).read_bytes())
    other = read_checkpoint(trained / "step=000002.ckpt")
    other["lmrep"]["model"] = {"family": "llama", "config": {"d_model": 32, "n_blocks": 2}}
    atomic_torch_save(other, mixed / "step=000002.ckpt")
    line = probe_fails(probe_args(mixed, prompts, tmp_path / "out"), capsys)
    assert line.startswith(f"error: {mixed} holds checkpoints of different models: {STEP0} is a mixer (")
    assert "step=000002.ckpt is a llama (d_model=32, n_blocks=2)" in line
    assert not (tmp_path / "out").exists()


def test_a_second_writer_on_one_output_folder_is_refused(trained: Path, tmp_path: Path, prompts: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    from lmrep.runs import OutputLock

    out = tmp_path / "probe"
    with OutputLock(out):  # another probe is writing here
        line = probe_fails(probe_args(trained / "step=000002.ckpt", prompts, out), capsys)
        assert line.startswith(f"error: {out} is being written by pid ") and line.endswith("use another --out")
        assert not (out / RESULTS_FILE).exists()
    assert probe_main(probe_args(trained / "step=000002.ckpt", prompts, out)) == 0  # free again


def test_probe_checks_the_output_folder_before_any_work(trained: Path, tmp_path: Path, prompts: Path,
                                                        capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_on_probing(monkeypatch)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert probe_fails(probe_args(trained, prompts, a_file), capsys) == \
        f"error: output folder {a_file} is a file: give a folder for --out"
    below = a_file / "probe"
    assert probe_fails(probe_args(trained, prompts, below), capsys) == \
        f"error: cannot create output folder {below}: {a_file} is a file"
    assert calls == []


def test_a_cut_results_file_resumes_past_its_damaged_tail(trained: Path, tmp_path: Path, prompts: Path,
                                                          capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "probe"
    args = probe_args(trained / "step=000002.ckpt", prompts, out)
    assert probe_main(args) == 0
    whole = read_results(out)
    text = (out / RESULTS_FILE).read_text()
    (out / RESULTS_FILE).write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])  # the last row cut
    capsys.readouterr()
    calls = spy_on_probing(monkeypatch)
    assert probe_main(args) == 0
    err = capsys.readouterr().err
    assert "had 1 damaged line(s)" in err and "Traceback" not in err
    assert (out / (RESULTS_FILE + ".damaged")).exists()
    assert len(calls) == 1  # only the group that lost a row is solved again
    again = read_results(out)
    key = lambda r: (r["block"], r["mask"], r["prompt_index"], r["context"])  # noqa: E731
    assert sorted(map(key, again)) == sorted(map(key, whole))
    assert {key(r): r["recovered_ids"] for r in again} == {key(r): r["recovered_ids"] for r in whole}


def test_ctrl_c_says_what_was_kept_in_one_line(trained: Path, tmp_path: Path, prompts: Path,
                                               capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import lmrep.runs as runs

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "probe_rows", interrupted)
    out = tmp_path / "probe"
    assert probe_main(probe_args(trained, prompts, out)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()][-1].startswith(
        f"interrupted: {out / RESULTS_FILE} keeps every finished")


def test_tokens_cuts_prompt_file_lines_too(trained: Path, tmp_path: Path, prompts: Path) -> None:
    out = tmp_path / "probe"
    assert probe_main([*probe_args(trained / "step=000002.ckpt", prompts, out), "--tokens", "4"]) == 0
    assert {len(r["target_ids"]) for r in read_results(out)} == {4}


def test_probe_seed_is_its_own_option(trained: Path, tmp_path: Path, prompts: Path) -> None:
    ckpt = trained / "step=000002.ckpt"
    ids = {}
    for name, extra in (("seed", ["--seed", "3"]), ("probe_seed", ["--probe-seed", "3"]),
                        ("both", ["--seed", "5", "--probe_seed", "3"]), ("other", ["--probe-seed", "4"])):
        assert probe_main([*probe_args(ckpt, prompts, tmp_path / name), *extra]) == 0
        ids[name] = read_results(tmp_path / name)[0]["settings_id"]
    assert ids["seed"] == ids["probe_seed"] == ids["both"] != ids["other"]


def test_a_run_that_fails_before_its_first_step_leaves_nothing(tmp_path: Path, data_cache: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    """No run folder and no W&B run id file that a later run in the same run_dir would continue."""
    empty = tmp_path / "stories"
    (empty / "train").mkdir(parents=True)
    (empty / "train" / "000.txt").write_text("<|endoftext|>\n\n")
    run = tmp_path / "run"
    cfg = config(tmp_path / "c.yaml", run, data_cache, steps=2, every=2, data={"data_dir": str(empty)})
    assert fails(["fit", "--config", str(cfg)], capsys).startswith("error: no train stories")
    assert not (run / RUN_ID_FILE).exists() and not run.exists()
    # Parsing a config (as the YAML tests do) writes nothing either.
    TrainCLI(LanguageModelModule, TinyStoriesDataModule, args=["--config", str(cfg)], run=False)
    assert not run.exists()
