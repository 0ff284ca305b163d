"""Training one atlas family: a training config built from configs/*.yaml, run through lmrep's own CLI.

Each family trains in its own run directory (checkpoints on the preset's
schedule, its W&B run, `losses.json`), through `lmrep.cli.main`, so an atlas run
trains exactly as `train.py fit` does and a killed run resumes from its
`last.ckpt`. `train.done` marks a finished run; `val_loss.json` holds the final
validation loss with its spread over validation batches.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml

from data.files import write_text_atomic
from lmrep.atlas.preset import DataSpec, Schedule, Training, TrainedFamily
from lmrep.configs import read_config
from lmrep.checkpoints import STEP_FILENAME, StepCheckpoint

DONE_FILE = "train.done"
LOSSES_FILE = "losses.json"
VAL_LOSS_FILE = "val_loss.json"
REPO = Path(__file__).resolve().parents[2]


class ScheduledCheckpoint(StepCheckpoint):
    """StepCheckpoint that also saves at the listed early steps (the log-spaced 1, 2, 4, ...)."""

    def __init__(self, *, steps: list[int], every_n_train_steps: int = 100, dirpath: str | None = None) -> None:
        """
        Args:
            steps: extra steps to checkpoint (step 0 and every N are StepCheckpoint's own).
            every_n_train_steps: save every this many steps.
            dirpath: where checkpoints go; default `<trainer.default_root_dir>/checkpoints`.
        """
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_train_steps)
        self.extra_steps = sorted(set(steps))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        step = trainer.global_step
        if step in self.extra_steps and self._last_global_step_saved != step:
            self._save_checkpoint(trainer, str(Path(self.dirpath) / f"{STEP_FILENAME.format(step=step)}.ckpt"))


class LossRecorder(L.Callback):
    """Keeps [step, loss] pairs of training and validation in `<run_dir>/losses.json` (kept across a resume)."""

    def __init__(self) -> None:
        self.losses: dict[str, Any] = {"train": [], "val": []}

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses = state_dict.get("losses", self.losses)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and trainer.global_step % trainer.log_every_n_steps == 0:
            self.losses["train"].append([trainer.global_step - 1, float(loss)])  # from the weights before the update

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if loss is None or trainer.sanity_checking:
            return
        val = [p for p in self.losses["val"] if p[0] != trainer.global_step]  # a resumed run re-validates
        self.losses["val"] = val + [[trainer.global_step, float(loss)]]
        self._write(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.losses["batches_per_epoch"] = int(trainer.num_training_batches)
        self._write(trainer)

    def _write(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            write_text_atomic(Path(trainer.default_root_dir) / LOSSES_FILE, json.dumps(self.losses))


def training_config(family: TrainedFamily, training: Training, d_model: int, data: DataSpec, run_dir: Path,
                    accelerator: str) -> dict[str, Any]:
    """The train.py config of one family at one width: its configs/*.yaml with the atlas's shared settings."""
    base = Path(family.config) if Path(family.config).is_absolute() else REPO / family.config
    cfg = read_config(base)  # a family file over configs/base.yaml
    model = cfg["model"]["model"]["init_args"]["config"]
    model.update(d_model=d_model, n_blocks=training.n_blocks, context_length=training.context_length, **family.model)
    cfg["seed_everything"] = training.seed
    cfg["run_dir"] = str(run_dir)
    cfg["model"].update(lr=training.lr, warmup_steps=training.warmup_steps)
    cfg["data"].update(source=data.source, cache_dir=data.cache_dir, batch_size=training.batch_size, packing=True,
                       seed=training.seed, **({"data_dir": data.data_dir} if data.data_dir else {}))
    cfg["trainer"].update(max_steps=training.max_steps, val_check_interval=min(training.val_every, training.max_steps),
                          check_val_every_n_epoch=None, limit_val_batches=training.val_batches,
                          log_every_n_steps=max(1, min(10, training.max_steps // 10)),
                          accelerator="gpu" if accelerator == "cuda" else "cpu", devices=1,
                          enable_model_summary=False)
    cfg["trainer"]["callbacks"] = [
        checkpoint_callback(training.schedule, training.max_steps),
        {"class_path": "lmrep.callbacks.TokensPerSecond"},
        {"class_path": "lmrep.atlas.training.LossRecorder"},
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
    ]
    return cfg


def checkpoint_callback(schedule: Schedule, max_steps: int) -> dict[str, Any]:
    """The checkpoint callback of the schedule: lmrep's CheckpointSchedule where it exists, else ScheduledCheckpoint."""
    import lmrep.checkpoints as checkpoints

    if hasattr(checkpoints, "CheckpointSchedule"):
        return {"class_path": "lmrep.checkpoints.StepCheckpoint",
                "init_args": {"schedule": {"every": schedule.every, "log_until": schedule.log_until}}}
    steps = [s for s in schedule.steps(max_steps) if s % schedule.every and s not in (0, max_steps)]
    return {"class_path": "lmrep.atlas.training.ScheduledCheckpoint",
            "init_args": {"steps": steps, "every_n_train_steps": schedule.every}}


def train_family(cfg: dict[str, Any], run_dir: Path) -> bool:
    """Train (or resume) the run of `cfg` to its last step; False when it was already done."""
    if (run_dir / DONE_FILE).exists():
        return False
    from lmrep.cli import main

    run_dir.mkdir(parents=True, exist_ok=True)
    if not sys.stdout.isatty():
        # Lightning's default bar (Rich, when installed) draws nothing into a log file until the run ends; tqdm
        # writes a line every 1% of the run. Added here, after the run's key is taken: it does not change weights.
        bar = {"class_path": "lightning.pytorch.callbacks.TQDMProgressBar",
               "init_args": {"refresh_rate": max(1, cfg["trainer"]["max_steps"] // 100)}}
        cfg = {**cfg, "trainer": {**cfg["trainer"], "callbacks": [*cfg["trainer"]["callbacks"], bar]}}
    config = run_dir / "atlas_train.yaml"
    write_text_atomic(config, yaml.safe_dump(cfg, sort_keys=False))
    cli = main(["fit", "--config", str(config)])
    if cli is None or cli.trainer.global_step < cfg["trainer"]["max_steps"]:
        raise RuntimeError(f"training in {run_dir} stopped before step {cfg['trainer']['max_steps']}")
    write_validation_loss(cli.model.model, cli.datamodule, run_dir, cfg["trainer"]["limit_val_batches"])
    write_text_atomic(run_dir / DONE_FILE, f"{cli.trainer.global_step}\n")
    return True


@torch.no_grad()
def write_validation_loss(model: torch.nn.Module, datamodule: Any, run_dir: Path, batches: int) -> dict[str, float]:
    """The final weights' validation loss (nats/token): mean and 95% interval over validation batches."""
    from lmrep.module import next_token_loss

    model.eval()
    device = next(model.parameters()).device
    losses, tokens = [], []
    for i, batch in enumerate(datamodule.val_dataloader()):
        if i >= batches:
            break
        loss, n = next_token_loss(model(batch["input_ids"].to(device)), batch["labels"].to(device))
        losses.append(float(loss))
        tokens.append(int(n))
    values = np.array(losses)
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    mean = float(np.average(values, weights=tokens))
    record = {"val_loss": mean, "val_loss_lo": mean - half, "val_loss_hi": mean + half, "batches": len(values),
              "tokens_per_step": datamodule.batch_size * model.context_length}
    write_text_atomic(run_dir / VAL_LOSS_FILE, json.dumps(record))
    return record


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's object, {} when absent."""
    return json.loads(path.read_text()) if path.exists() else {}
