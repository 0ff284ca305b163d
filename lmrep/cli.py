"""The training command line: LightningCLI over the LightningModule and the data module.

`python train.py fit --config configs/quickstart.yaml` trains; every value in the
YAML can be overridden on the command line (`--trainer.max_steps 50`). Re-running
the same command after a crash resumes from `<run_dir>/checkpoints/last.ckpt`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI

from data.tinystories import TinyStoriesDataModule
from lmrep.module import LanguageModelModule

DEFAULT_LOGGER = "lmrep.loggers.RunLogger"


def default_precision() -> str:
    """bf16-mixed where the GPU supports it, full fp32 otherwise (bf16 on CPU is ~100x slower)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


class TrainCLI(LightningCLI):
    """LightningCLI with a run directory, model-derived context length, and resume-by-default."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_dir", type=str, default="runs/default",
                            help="Run directory: checkpoints, W&B files, probe results.")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = Path(cfg.run_dir)
        cfg.trainer.default_root_dir = str(run_dir)
        model_cfg = cfg.model.model.init_args.config
        if cfg.data.context_length is None:
            cfg.data.context_length = model_cfg.context_length
        elif cfg.data.context_length > model_cfg.context_length:
            raise ValueError(f"data.context_length {cfg.data.context_length} is longer than the model's "
                             f"context_length {model_cfg.context_length}")
        if cfg.trainer.precision is None:
            cfg.trainer.precision = default_precision()
        if cfg.trainer.logger is None or cfg.trainer.logger is True:
            cfg.trainer.logger = {"class_path": DEFAULT_LOGGER, "init_args": {"save_dir": str(run_dir)}}
        last = run_dir / "checkpoints" / "last.ckpt"
        if self.subcommand == "fit" and cfg.get("ckpt_path") is None and last.exists():
            print(f"resuming from {last}", file=sys.stderr)
            cfg.ckpt_path = str(last)


def main(args: list[str] | None = None) -> TrainCLI | None:
    """Entry point of train.py; known faults print one line unless LMREP_DEBUG=1."""
    torch.set_float32_matmul_precision("high")  # TF32 on GPUs that have it; no effect on CPU
    try:
        return TrainCLI(
            LanguageModelModule,
            TinyStoriesDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
        )
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        if os.environ.get("LMREP_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
