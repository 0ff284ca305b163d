"""The training command line: LightningCLI over the LightningModule and the data module.

`python train.py fit --config configs/quickstart.yaml` trains; every value in the
YAML can be overridden on the command line (`--trainer.max_steps 50`). Re-running
the same command after a crash resumes from `<run_dir>/checkpoints/last.ckpt`.

Checkpoints are read with `weights_only=True` on every path (the resume path
included, through `SafeCheckpointIO`) and checked before anything is written, and
bad input ends in one `error: ...` line (exit code 2) unless LMREP_DEBUG=1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.trainer import Trainer

from data.tinystories import TinyStoriesDataModule
from lmrep.checkpoints import SafeCheckpointIO, check_resume, read_metadata
from lmrep.configs import config_chain
from lmrep.module import LanguageModelModule
from models import model_class

DEFAULT_LOGGER = "lmrep.loggers.RunLogger"
DEBUG_ENV = "LMREP_DEBUG"  # set to 1 for full tracebacks instead of one-line errors
DEBUG_FLAG = "--debug"  # the same, on the command line (taken out before LightningCLI parses)
# `ckpt_path` values that Lightning resolves itself rather than reading a file.
_SPECIAL_CKPT_PATHS = ("best", "last", "hpc")


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
        # Build the config dataclass now: its range errors must come before the logger
        # (instantiated first) creates the run directory.
        model_class(cfg.model.model.class_path).config_class(**model_cfg.as_dict())  # the family registry's class
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
        if self.subcommand is not None:
            if cfg.get("weights_only") is False:
                raise ValueError("weights_only=false is not supported: lmrep never loads pickled code from checkpoints")
            cfg.weights_only = True
            self._resume_meta = self._check_ckpt_path(cfg.get("ckpt_path"))

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads an explicit ckpt_path's hyper-parameters before any public hook
        # (with weights_only=True); check the file first so a bad one gives a one-line error.
        if self.config.get("subcommand"):
            self._check_ckpt_path(self.config[self.config.subcommand].get("ckpt_path"))
        super()._parse_ckpt_path()

    @staticmethod
    def _check_ckpt_path(ckpt_path: str | None) -> dict[str, Any] | None:
        """Fail now, before a run directory or W&B run is touched, if the checkpoint cannot be used."""
        if ckpt_path is None or ckpt_path in _SPECIAL_CKPT_PATHS or "://" in ckpt_path:
            return None
        # mmap: the tensors are mapped, not read, so the check costs little even for a big file
        return read_metadata(ckpt_path)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured Trainer, with SafeCheckpointIO unless a plugin list is configured."""
        if self._get(self.config_init, "trainer", default={}).get("plugins") is None:
            kwargs.setdefault("plugins", [SafeCheckpointIO()])
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        """Refuse to resume a checkpoint of another tokenizer or model before training starts."""
        meta = getattr(self, "_resume_meta", None)
        if meta is None:
            return
        check_resume(self.config[self.subcommand].ckpt_path, meta, tokenizer_hash=self.datamodule.tokenizer_hash,
                     model=self.model.model)


def main(args: list[str] | None = None) -> TrainCLI | None:
    """Entry point of train.py; known faults print one line unless `--debug` or LMREP_DEBUG=1."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = bool(os.environ.get(DEBUG_ENV)) or DEBUG_FLAG in argv
    if DEBUG_FLAG in argv or args is not None:
        args = [a for a in argv if a != DEBUG_FLAG]
    torch.set_float32_matmul_precision("high")  # TF32 on GPUs that have it; no effect on CPU
    try:
        check_config_files(argv)
        return TrainCLI(
            LanguageModelModule,
            TinyStoriesDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
            # parse errors raise instead of printing the whole usage: main() prints one line
            parser_kwargs={"exit_on_error": False},
        )
    except (ValueError, FileNotFoundError, FloatingPointError, argparse.ArgumentError) as err:
        if debug:
            raise
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None


def check_config_files(argv: list[str]) -> None:
    """Refuse a family YAML given without the base.yaml it is written over (alone it has no trainer settings)."""
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    given = {Path(f).resolve() for f in files}
    for f in files:
        if not Path(f).is_file():
            continue  # LightningCLI says so
        chain = config_chain(f)
        if len(chain) == 2 and chain[0].resolve() not in given:
            raise ValueError(f"{f} holds only what differs from {chain[0]}: "
                             f"run train.py fit --config {chain[0]} --config {f}")


def one_line(message: str) -> str:
    """A multi-line message (jsonargparse nests its reasons over lines) joined into one line."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())
