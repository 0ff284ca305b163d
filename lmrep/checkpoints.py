"""Checkpoints: a schedule of steps (0, log-spaced early, every N, last), the checkpoint contract, safe loading.

The contract lives here and only here. A checkpoint is a Lightning checkpoint
with lmrep's metadata under `checkpoint[CHECKPOINT_KEY]` (`checkpoint_metadata`):
the model family and config (enough to rebuild it), the tokenizer's hash and its
JSON (so a checkpoint decodes on its own), and the step. A checkpoint is used
only with the tokenizer and model it was written with (`check_tokenizer`,
`check_resume`). Loading never executes pickled code
(`torch.load(weights_only=True)`), also on Lightning's own resume path
(`SafeCheckpointIO`), and a checkpoint is written to a temporary file in its own
directory and renamed, so no half-written file ever carries a checkpoint's name.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
import torch
from torch import nn
from transformers import PreTrainedTokenizerFast

from data.files import atomic_write
from data.tokenizer import wrap_tokenizer
from models import build_model, model_spec

CHECKPOINT_KEY = "lmrep"  # where lmrep's own metadata lives inside a Lightning checkpoint
STEP_FILENAME = "step={step:06d}"  # zero-padded so names sort in step order
_STEP_PATTERN = re.compile(r"step=(\d+)")
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")  # in torch's weights_only refusal


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not match what it is used with."""


# ---- what a checkpoint carries, and what it may be used with ------------------------------------


def checkpoint_metadata(model: nn.Module, *, step: int, tokenizer_hash: str | None,
                        tokenizer_json: str | None) -> dict[str, Any]:
    """lmrep's part of a checkpoint (stored under CHECKPOINT_KEY): model spec, tokenizer hash and JSON, step."""
    return {"model": model_spec(model), "tokenizer_hash": tokenizer_hash, "tokenizer_json": tokenizer_json,
            "step": int(step)}


def check_tokenizer(path: str | Path, saved: str | None, ours: str | None, *, resuming: bool = False) -> None:
    """Refuse to pair a checkpoint trained with tokenizer `saved` with tokenizer `ours` (None: unknown, allowed).

    `resuming`: `ours` is the training data's tokenizer (train.py); otherwise a tokenizer given to load with.
    """
    if saved is None or ours is None or saved == ours:
        return
    if resuming:
        raise CheckpointError(
            f"{path} was trained with tokenizer {saved}, but the data's tokenizer is {ours}: "
            "resume with the tokenizer it was trained with (data.tokenizer_path) or start a new run_dir"
        )
    raise CheckpointError(
        f"{path} was trained with tokenizer {saved}, not the given tokenizer {ours}: "
        "use the tokenizer stored in the checkpoint"
    )


def check_resume(path: str | Path, meta: dict[str, Any], *, tokenizer_hash: str | None, model: nn.Module) -> None:
    """Refuse to resume training from a checkpoint of another tokenizer or another model."""
    check_tokenizer(path, meta.get("tokenizer_hash"), tokenizer_hash, resuming=True)
    spec = model_spec(model)
    if meta.get("model") and meta["model"] != spec:
        raise CheckpointError(f"{path} holds a {meta['model']} model, but the config builds {spec}")


def metadata_step(meta: dict[str, Any], raw: dict[str, Any] | None = None) -> int:
    """The optimiser step a checkpoint's weights are at (older files: Lightning's global_step)."""
    return int(meta.get("step", (raw or {}).get("global_step", 0)))


def tokenizer_from_json(text: str) -> PreTrainedTokenizerFast:
    """Rebuild the tokenizer stored inside a checkpoint (exactly as data.tokenizer loads one)."""
    return wrap_tokenizer(text, name="the checkpoint's tokenizer")


# ---- which steps are saved ------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointSchedule:
    """Which optimiser steps are checkpointed: step 0, a log-spaced early phase, then every N, plus explicit steps.

    Invertibility moves fastest in the first hundred steps, so a linear 0/100/200 grid
    misses it; like Pythia's checkpoints (0, 1, 2, 4, ..., 512, then every 1000) the
    early phase is log-spaced. The schedule is a pure function of the step, so a
    resumed run continues it exactly. `StepCheckpoint` saves these steps and
    `ProbeCallback` probes them; in YAML: `schedule: {every: 100, log_until: 64}`.
    """

    every: int = 100
    """After the early phase, save every this many optimiser steps (0 = never)."""
    log_until: int = 0
    """Early phase: steps 1, 2, 4, ... up to and including this power of two (0 = no early phase)."""
    steps: tuple[int, ...] = ()
    """Explicit extra steps to save."""

    def __post_init__(self) -> None:
        if not _is_count(self.every):
            raise ValueError(f"every must be an integer >= 0 (0 = never), got {self.every}")
        if not _is_count(self.log_until) or (self.log_until and self.log_until & (self.log_until - 1)):
            raise ValueError(f"log_until must be 0 (off) or a power of two (1, 2, 4, ..., 512), got {self.log_until}")
        for step in self.steps:
            if not _is_count(step):
                raise ValueError(f"steps must be integers >= 0, got {step}")
        object.__setattr__(self, "steps", tuple(sorted(set(self.steps))))  # frozen: normalised once, here

    @property
    def log_spaced(self) -> bool:
        """True when the schedule has a log-spaced early phase (its curves read best on a symlog axis)."""
        return self.log_until > 0

    def __contains__(self, step: int) -> bool:
        """Is this step saved? Step 0 (the untrained weights) always is."""
        if step == 0 or step in self.steps:
            return True
        if 0 < step <= self.log_until:
            return step & (step - 1) == 0  # a power of two
        return self.every > 0 and step > self.log_until and step % self.every == 0

    def steps_until(self, max_steps: int) -> list[int]:
        """Every step a run of `max_steps` saves, sorted: the schedule's steps and the final step itself."""
        if not _is_count(max_steps):
            raise ValueError(f"max_steps must be an integer >= 0, got {max_steps}")
        early = [1 << k for k in range(self.log_until.bit_length()) if 1 << k <= min(self.log_until, max_steps)]
        first = (self.log_until // self.every + 1) * self.every if self.every else max_steps + 1
        grid = range(first, max_steps + 1, self.every) if self.every else range(0)
        return sorted({0, *early, *grid, *(s for s in self.steps if s <= max_steps), max_steps})


def _is_count(value: Any) -> bool:
    """An int >= 0 (bool is not a count, though Python calls it an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that saves the steps of a `CheckpointSchedule`, step 0 before the first update, and the last.

    Lightning has no option for a step-0 checkpoint (probing needs the untrained
    weights of the same run) nor for a log-spaced schedule, so the steps are
    chosen here, in `on_train_batch_end`, and ModelCheckpoint's machinery writes
    them (`step=000100.ckpt`, `last.ckpt` that a resumed run starts from). A
    resumed run continues the schedule: the step it resumes from is not saved
    again, and the step-0 file is written only once.
    """

    def __init__(self, *, dirpath: str | None = None, schedule: CheckpointSchedule | None = None,
                 save_last: bool = True, every_n_train_steps: int | None = None) -> None:
        """
        Args:
            dirpath: where checkpoints go; default `<trainer.default_root_dir>/checkpoints`.
            schedule: which steps to save (default: every 100 steps).
            save_last: also keep `last.ckpt`, the one a resumed run starts from.
            every_n_train_steps: deprecated, the same as `schedule: {every: N}`.
        """
        if every_n_train_steps is not None:
            if schedule is not None:
                raise ValueError("give StepCheckpoint either schedule or every_n_train_steps (deprecated), not both")
            warnings.warn("StepCheckpoint(every_n_train_steps=N) is deprecated: use schedule: {every: N}",
                          DeprecationWarning, stacklevel=2)
            schedule = CheckpointSchedule(every=every_n_train_steps)
        self.schedule = schedule if schedule is not None else CheckpointSchedule()
        super().__init__(
            dirpath=dirpath,
            filename=STEP_FILENAME,
            auto_insert_metric_name=False,
            every_n_train_steps=0,  # ModelCheckpoint's own triggers are off: the schedule decides
            save_top_k=-1,
            save_last=save_last,
            enable_version_counter=False,
        )

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key holds its triggers; this one's only trigger is the schedule, which may
        # change on a resume (the state it keys, last.ckpt's path, is still this callback's).
        return self._generate_state_key(filename=STEP_FILENAME)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.global_step != 0:
            # Resumed: the checkpoint of this step exists already (it is what the run resumed from).
            self._last_global_step_saved = trainer.global_step
            return
        path = Path(self.dirpath) / f"{STEP_FILENAME.format(step=0)}{self.FILE_EXTENSION}"
        # Rank 0 decides for every rank: saving is collective (it ends in a barrier).
        if not trainer.strategy.broadcast(path.exists()):
            self._save_checkpoint(trainer, str(path))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Under gradient accumulation this runs once per micro-batch: a step is saved once
        # (_should_skip_saving_checkpoint knows the last step saved).
        if trainer.global_step in self.schedule and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # A checkpoint of NaN/inf weights would become the `last.ckpt` a resume starts from.
        bad = next((name for name, p in trainer.lightning_module.named_parameters()
                    if not torch.isfinite(p).all()), None)
        if bad is not None:
            raise FloatingPointError(
                f"weights became non-finite at step {trainer.global_step} ({bad}); not writing "
                f"{Path(filepath).name}: lower the learning rate, or resume from the last good checkpoint"
            )
        super()._save_checkpoint(trainer, filepath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The final step is kept too, whether or not the schedule has it.
        if self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


# ---- reading and writing -----------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    """A model rebuilt from a checkpoint, with what it was trained with."""

    path: Path
    model: nn.Module
    step: int
    spec: dict[str, Any]
    tokenizer_hash: str | None
    tokenizer: PreTrainedTokenizerFast | None


def _safe_load(path: Path, map_location: Any = "cpu", *, mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` of a local file; every way it can fail becomes one CheckpointError line."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    # torch.save writes a zip archive; a truncated one has no central directory. Checking first
    # also keeps torch from falling back to its legacy format, whose errors are unreadable.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a torch checkpoint archive (truncated, or another kind of file)"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        refused = _UNSAFE_GLOBAL.search(str(err))
        what = f"it asks to call {refused.group(1)}" if refused else _first_line(err)
        raise CheckpointError(
            f"refusing to load checkpoint {path}: it holds pickled code, not only weights ({what}); "
            "lmrep loads checkpoints with weights_only=True"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt): {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (torch's are often paragraphs)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def read_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint's raw dict without executing pickled code; clear errors for bad files.

    `mmap=True` maps the tensors instead of reading them: a cheap way to validate a file.
    """
    path = Path(path)
    raw = _safe_load(path, mmap=mmap)
    if not isinstance(raw, dict) or CHECKPOINT_KEY not in raw or "state_dict" not in raw:
        raise CheckpointError(f"{path} is not an lmrep checkpoint (no model metadata)")
    return raw


def read_metadata(path: str | Path) -> dict[str, Any]:
    """lmrep's metadata of a checkpoint, validated (safe load, tensors mapped rather than read: cheap)."""
    return read_checkpoint(path, mmap=True)[CHECKPOINT_KEY]


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with weights-only loading and atomic local writes.

    Loading: Lightning passes `weights_only=None` by default (torch's default, which an
    environment variable can turn off); this always loads with `weights_only=True`.
    Saving: Lightning's `_atomic_save` writes through an fsspec transaction whose
    temporary file lives in the system temp dir, so the final `shutil.move` is a plain
    copy into the checkpoint's name whenever /tmp is another file system; a kill during
    that copy leaves a truncated checkpoint. Here the temporary file sits beside the
    target, is fsynced, and `os.replace` (atomic on POSIX) gives it its name.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's transaction is the atomic primitive there
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options for local files")
        atomic_torch_save(checkpoint, Path(path))

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return _safe_load(Path(path), map_location)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save` to `path` so that `path` is either absent/old or the whole new file, never a partial one."""
    with atomic_write(path, "wb") as f:  # beside the target, fsynced, renamed; the umask's permissions
        torch.save(obj, f)


def load_checkpoint(path: str | Path, *, tokenizer_hash: str | None = None) -> LoadedCheckpoint:
    """Rebuild the model of a checkpoint; error if it was trained with another tokenizer."""
    path = Path(path)
    raw = read_checkpoint(path)
    meta = raw[CHECKPOINT_KEY]
    saved_hash = meta.get("tokenizer_hash")
    check_tokenizer(path, saved_hash, tokenizer_hash)
    model = build_model(**meta["model"])
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in raw["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not match its model config: {str(err).splitlines()[0]}") from err
    model.eval()
    tokenizer = tokenizer_from_json(meta["tokenizer_json"]) if meta.get("tokenizer_json") else None
    return LoadedCheckpoint(
        path=path,
        model=model,
        step=metadata_step(meta, raw),
        spec=meta["model"],
        tokenizer_hash=saved_hash,
        tokenizer=tokenizer,
    )


def checkpoint_step(path: Path) -> int | None:
    """The step in a checkpoint's file name (`step=000100.ckpt` -> 100), or None (e.g. last.ckpt)."""
    match = _STEP_PATTERN.search(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Every checkpoint in a directory in step order; `last.ckpt` only if its step has no file of its own."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    by_step: dict[int, Path] = {}
    for path in sorted(directory.glob("*.ckpt")):
        step = checkpoint_step(path)
        if step is not None:
            by_step[step] = path
    last = directory / "last.ckpt"
    if last.exists():
        step = metadata_step(read_metadata(last))
        by_step.setdefault(step, last)
    if not by_step:
        raise CheckpointError(f"no checkpoints (*.ckpt) in {directory}")
    return [by_step[s] for s in sorted(by_step)]
