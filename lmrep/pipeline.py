"""One probe orchestration for probe.py and ProbeCallback: sources -> rows -> summary -> plots -> report -> W&B.

`probe_and_report` probes every model source under a `ProbePlan` into
`out_dir/results.jsonl` (resumable, `lmrep.runs`), then, on the main process,
writes the summary, plots and HTML report (`lmrep.report`) and logs the
recovery curves to a W&B sink: a run of its own (probe.py) or the training
run's loggers (ProbeCallback), so both paths produce the same outputs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerFast

from lmrep.probe import ProbeSettings
from lmrep.prompts import PromptSet
from lmrep.report import summary_table, wandb_charts, wandb_scalars, wandb_table, write_report
from lmrep.runs import ModelSource, OutputLock, run_probe
from lmrep.sharding import Shard


@dataclass
class ProbePlan:
    """What is probed in every model: blocks, masks and contexts, and how (the settings)."""

    blocks: str | list[int] = "all"
    """'all' (blocks 1..n), or a list like 1,4,8 (0 is the embedding itself)."""
    masks: list[int] = field(default_factory=lambda: [0, 1])
    """Masks m: positions < m are left out of the loss (m = 0: self only)."""
    contexts: list[str] = field(default_factory=lambda: ["prompt"])
    """prompt and/or padded (see ProbeSettings.context)."""
    settings: ProbeSettings = field(default_factory=ProbeSettings)
    """How each inversion is run (its `context` is taken from `contexts`)."""


class WandbSink(Protocol):
    """Where the recovery curves go: per-step scalars, then charts and the table of reconstructions."""

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Scalars of one training step."""
        ...

    def log_final(self, items: dict[str, Any]) -> None:
        """Charts and tables, once the steps are all in."""
        ...


class WandbRun:
    """A W&B run of its own (offline unless credentials), opened on first use; `close()` finishes it."""

    def __init__(self, out_dir: Path, config: dict[str, Any]) -> None:
        self.out_dir, self.config, self.run = out_dir, config, None

    def _open(self) -> Any:
        if self.run is None:
            import wandb

            from lmrep.loggers import has_wandb_credentials

            online = has_wandb_credentials() and os.environ.get("WANDB_MODE") != "offline"
            self.run = wandb.init(project="lmrep", dir=str(self.out_dir), job_type="probe",
                                  name=f"probe-{self.out_dir.name}", mode="online" if online else "offline",
                                  config=self.config, reinit="finish_previous")
            self.run.define_metric("train_step")
            self.run.define_metric("probe/*", step_metric="train_step")
        return self.run

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """One history row at x = train_step."""
        self._open().log({"train_step": step, **metrics})

    def log_final(self, items: dict[str, Any]) -> None:
        """Charts and the table, in one history row."""
        self._open().log(items)

    def close(self) -> None:
        """Finish the run and wait until it is on disk."""
        if self.run is not None:
            from lmrep.loggers import finish_writing

            self.run.finish()
            finish_writing()
            self.run = None


class TrainerLoggers:
    """The training run's loggers: scalars at the trainer's step, charts into its W&B run."""

    def __init__(self, loggers: Sequence[Any]) -> None:
        self.loggers = loggers

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Scalars through every logger, at the training step."""
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    def log_final(self, items: dict[str, Any]) -> None:
        """Charts and the table into the W&B logger's run."""
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.log(items)


@dataclass
class ProbeOutcome:
    """What one orchestration produced (on the main process; other ranks get their rows only)."""

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


@contextlib.contextmanager
def claim_output(out_dir: str | Path, shard: Shard) -> Iterator[None]:
    """Hold the output folder's writer lock on the main rank for the block; a refusal is raised on every rank."""
    lock, failure = None, None
    if shard.is_main:
        try:
            lock = OutputLock(out_dir)
            lock.acquire()
        except ValueError as err:
            failure = str(err)
    failure = shard.broadcast(failure)
    if failure is not None:
        raise ValueError(failure)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def probe_and_report(sources: Sequence[ModelSource], prompts: PromptSet, tokenizer: PreTrainedTokenizerFast,
                     plan: ProbePlan, out_dir: str | Path, *, title: str, tokenizer_hash: str | None = None,
                     shard: Shard | None = None, device: torch.device | str | None = None,
                     losses: dict[str, Sequence[Sequence[float]]] | None = None, sink: WandbSink | None = None,
                     log_steps: Iterable[int] | None = None, final: bool = True,
                     progress: bool = True, desc: str = "probing", leave: bool = True) -> ProbeOutcome:
    """Probe `sources` under `plan` into `out_dir`, then write the report and log to `sink`.

    Every rank of a sharded probe calls this alike; only the main rank writes.
    `log_steps` names the steps whose scalars go to the sink (None: every step in
    the results); with `final` the charts and the reconstruction table go too.
    `losses` ({"train": [[step, loss], ...], "val": ...}) are drawn above the curves.
    The progress bar (`desc`; kept on screen when `leave`) counts the rows solved.
    """
    shard = shard or Shard()
    with claim_output(out_dir, shard):  # one writer per output folder
        rows = run_probe(sources, prompts, tokenizer, blocks_spec=plan.blocks, masks=plan.masks,
                         settings=plan.settings, contexts=plan.contexts, out_dir=out_dir,
                         tokenizer_hash=tokenizer_hash, shard=shard, device=device, progress=progress,
                         desc=desc, leave=leave)
        if not shard.is_main:
            return ProbeOutcome(rows=rows)
        summary = summary_table(rows)
        files = write_report(rows, out_dir, title=title, losses=losses)
    if sink is not None:
        steps = sorted({s["step"] for s in summary}) if log_steps is None else sorted(set(log_steps))
        for step in steps:
            sink.log_step(step, wandb_scalars(summary, step))
        if final:
            sink.log_final({**wandb_charts(summary), "probe/reconstructions": wandb_table(rows)})
    return ProbeOutcome(rows=rows, summary=summary, files=files)
