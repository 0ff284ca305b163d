"""The checkpoint schedule and the checkpoint contract, on hand-made cases and tiny real training runs.

A schedule is a pure function of the step; these tests pin which steps it saves,
that a training run writes exactly those files (and probes exactly those steps),
and that a run which crashes and is re-run continues the schedule without
re-saving or skipping a step.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import yaml

from lmrep.checkpoints import CheckpointSchedule, StepCheckpoint, list_checkpoints, load_checkpoint
from lmrep.cli import main
from lmrep.loggers import RUN_ID_FILE
from lmrep.report import log_like_steps
from lmrep.runs import read_results
from tests.conftest import tiny_config


# ---- the schedule on its own ---------------------------------------------------------------------


def test_every_n_is_the_linear_grid() -> None:
    schedule = CheckpointSchedule(every=100)
    assert schedule.steps_until(300) == [0, 100, 200, 300]
    assert schedule.steps_until(250) == [0, 100, 200, 250]  # the final step is saved too
    assert 0 in schedule and 200 in schedule and 150 not in schedule and 1 not in schedule
    assert not schedule.log_spaced


def test_log_spaced_early_phase_then_every_n() -> None:
    schedule = CheckpointSchedule(every=100, log_until=64)
    assert schedule.log_spaced
    assert schedule.steps_until(300) == [0, 1, 2, 4, 8, 16, 32, 64, 100, 200, 300]
    assert 3 not in schedule and 128 not in schedule and 64 in schedule
    # Pythia's: 0, 1, 2, ..., 512, then every 1000; no multiple of N inside the early phase
    pythia = CheckpointSchedule(every=1000, log_until=512)
    assert pythia.steps_until(3000) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 3000]
    assert 500 not in CheckpointSchedule(every=100, log_until=512)
    assert 600 in CheckpointSchedule(every=100, log_until=512)


def test_explicit_steps_and_never() -> None:
    schedule = CheckpointSchedule(every=0, steps=(30, 5, 5))
    assert schedule.steps == (5, 30)  # sorted, once each
    assert schedule.steps_until(40) == [0, 5, 30, 40]
    assert schedule.steps_until(30) == [0, 5, 30]
    assert CheckpointSchedule(every=0).steps_until(7) == [0, 7]  # step 0 and the final step only
    assert CheckpointSchedule().steps_until(0) == [0]


def test_log_spaced_runs_get_the_symlog_axis() -> None:
    assert log_like_steps(CheckpointSchedule(every=100, log_until=64).steps_until(300))
    assert not log_like_steps(CheckpointSchedule(every=100).steps_until(300))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"every": -1}, "every must be an integer >= 0 (0 = never), got -1"),
    ({"every": 2.5}, "every must be an integer >= 0 (0 = never), got 2.5"),
    ({"log_until": 48}, "log_until must be 0 (off) or a power of two (1, 2, 4, ..., 512), got 48"),
    ({"log_until": -4}, "log_until must be 0 (off) or a power of two (1, 2, 4, ..., 512), got -4"),
    ({"steps": (3, -1)}, "steps must be integers >= 0, got -1"),
    ({"steps": (True,)}, "steps must be integers >= 0, got True"),
])
def test_bad_schedules_are_one_line_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        CheckpointSchedule(**kwargs)
    assert str(info.value) == message


def test_step_checkpoint_takes_a_schedule_or_the_old_interval() -> None:
    schedule = CheckpointSchedule(every=10, log_until=4)
    assert StepCheckpoint(schedule=schedule).schedule == schedule
    with pytest.warns(DeprecationWarning, match="every_n_train_steps"):
        assert StepCheckpoint(every_n_train_steps=25).schedule == CheckpointSchedule(every=25)
    with pytest.raises(ValueError, match="either schedule or every_n_train_steps"):
        StepCheckpoint(schedule=schedule, every_n_train_steps=25)


# ---- the schedule in real training runs ----------------------------------------------------------

SCHEDULE = {"every": 6, "log_until": 4, "steps": [3]}  # 0, 1, 2, 3, 4, 6, 12, ... and the final step
PROBE = {"class_path": "lmrep.callbacks.ProbeCallback",
         "init_args": {"num_prompts": 1, "tokens": 4, "masks": [0], "contexts": ["prompt"],
                       "settings": {"steps": 2}}}


class CrashAtStep(L.Callback):
    """Raises when step `step` starts: the run dies after the checkpoints of the steps before it, like a kill."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step}")


def scheduled_config(path: Path, run: Path, cache: Path, *, steps: int,
                     callbacks: list[dict[str, Any]] | None = None) -> Path:
    """A tiny run whose StepCheckpoint follows SCHEDULE, without validation (these tests are about saving)."""
    tiny_config(path, "flat", run, cache, steps=steps, every=1, callbacks=callbacks)
    cfg = yaml.safe_load(path.read_text())
    for c in cfg["trainer"]["callbacks"]:
        if c["class_path"].endswith("StepCheckpoint"):
            c["init_args"] = {"schedule": SCHEDULE}
    cfg["trainer"]["val_check_interval"] = 1000
    cfg["data"]["max_train_stories"] = 64
    path.write_text(yaml.safe_dump(cfg))
    return path


def saved_steps(ckpts: Path) -> list[int]:
    return [load_checkpoint(p).step for p in list_checkpoints(ckpts)]


def probed_steps(out: Path) -> list[int]:
    return sorted({row["step"] for row in read_results(out)})


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_log_spaced_schedule_saves_and_probes_exactly_its_steps(tmp_path: Path, data_cache: Path) -> None:
    run = tmp_path / "run"
    main(["fit", "--config", str(scheduled_config(tmp_path / "c.yaml", run, data_cache, steps=8,
                                                  callbacks=[PROBE]))])
    expected = CheckpointSchedule(**SCHEDULE).steps_until(8)
    assert expected == [0, 1, 2, 3, 4, 6, 8]
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"] + [f"step={s:06d}.ckpt" for s in expected]
    assert saved_steps(ckpts) == expected
    assert load_checkpoint(ckpts / "last.ckpt").step == 8
    assert probed_steps(run / "probe") == expected


def test_a_crashed_run_continues_its_schedule(tmp_path: Path, data_cache: Path) -> None:
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    crashing = scheduled_config(tmp_path / "a.yaml", run, data_cache, steps=14,
                                callbacks=[PROBE, {"class_path": "tests.test_checkpoints.CrashAtStep",
                                                   "init_args": {"step": 5}}])
    with pytest.raises(RuntimeError, match="crash at step 5"):
        main(["fit", "--config", str(crashing)])
    assert saved_steps(ckpts) == [0, 1, 2, 3, 4]  # step 5 was never finished
    assert load_checkpoint(ckpts / "last.ckpt").step == 4
    before = {p.name: sha(p) for p in ckpts.glob("step=*.ckpt")}

    main(["fit", "--config", str(scheduled_config(tmp_path / "b.yaml", run, data_cache, steps=14,
                                                  callbacks=[PROBE]))])
    expected = [0, 1, 2, 3, 4, 6, 12, 14]
    assert saved_steps(ckpts) == expected
    assert sorted(p.name for p in ckpts.glob("step=*.ckpt")) == [f"step={s:06d}.ckpt" for s in expected]
    assert {name: sha(ckpts / name) for name in before} == before  # nothing saved twice
    assert load_checkpoint(ckpts / "last.ckpt").step == 14
    assert probed_steps(run / "probe") == expected
    assert (run / RUN_ID_FILE).exists()
