"""Callbacks for the non-essential: throughput and sample generations."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from lmrep.checkpoints import CheckpointSchedule, StepCheckpoint
from lmrep.pipeline import ProbePlan
from lmrep.probe import ProbeSettings


class TokensPerSecond(L.Callback):
    """Logs `train/tokens_per_sec`: tokens over the time spent in training steps, per logging window.

    Only the span from batch start to batch end counts (forward, backward, optimiser
    step), so validation, checkpointing and probing between steps never dilute it.
    """

    def __init__(self) -> None:
        self._batch_start = 0.0
        self._seconds = 0.0
        self._tokens = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict[str, Tensor], batch_idx: int
    ) -> None:
        log_now = trainer.global_step % trainer.log_every_n_steps == 0
        if log_now and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # count the queued GPU work in this window
        self._seconds += time.perf_counter() - self._batch_start
        self._tokens += batch["input_ids"].numel() * trainer.world_size
        if log_now:
            pl_module.log("train/tokens_per_sec", self._tokens / self._seconds)
            self._seconds, self._tokens = 0.0, 0


@torch.no_grad()
def generate(model: torch.nn.Module, ids: Tensor, *, max_new_tokens: int, context_length: int,
             temperature: float = 0.0, eos_token_id: int | None = None,
             generator: torch.Generator | None = None) -> Tensor:
    """Greedy (temperature 0) or sampled continuation of one sequence ids (1, t)."""
    for _ in range(max_new_tokens):
        if ids.size(1) >= context_length:
            break
        logits = model(ids)[:, -1, :]  # (1, vocab)
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        else:
            nxt = logits.argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, nxt.to(ids.device)], dim=1)
        if eos_token_id is not None and int(nxt) == eos_token_id:
            break
    return ids


class SampleGenerations(L.Callback):
    """At every validation, continues a few story openings (greedy and sampled) and logs them."""

    def __init__(
        self,
        *,
        prompts: list[str] | None = None,
        max_new_tokens: int = 48,
        temperature: float = 0.8,
        seed: int = 0,
    ) -> None:
        """
        Args:
            prompts: story openings; default a few typical TinyStories openings.
            max_new_tokens: tokens to generate per continuation.
            temperature: sampling temperature of the sampled continuation (the other is greedy).
            seed: seed of the sampled continuation, so samples differ only by training.
        """
        self.prompts = prompts or ["Once upon a time", "One day, a little girl named Lily", "Tom and his dog"]
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self.history: list[list[Any]] = []

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        tokenizer = trainer.datamodule.tokenizer
        model = pl_module.model
        was_training = model.training
        model.eval()
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        rows = []
        for prompt in self.prompts:
            ids = torch.tensor([tokenizer.encode(prompt)], device=pl_module.device)
            for mode, temperature in (("greedy", 0.0), ("sampled", self.temperature)):
                out = generate(model, ids, max_new_tokens=self.max_new_tokens,
                               context_length=model.context_length, temperature=temperature,
                               eos_token_id=tokenizer.eos_token_id, generator=generator)
                text = tokenizer.decode(out[0, ids.size(1):].tolist(), skip_special_tokens=True)
                rows.append([trainer.global_step, mode, prompt, text])
        model.train(was_training)
        self.history.extend(rows)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_text("samples", columns=["step", "mode", "prompt", "continuation"], data=self.history,
                                step=trainer.global_step)
        step, _, prompt, text = rows[0]
        flat = text.replace("\n", " / ")
        message = f"[step {step}] {prompt} >>>{flat}"
        if trainer.progress_bar_callback is not None:
            trainer.progress_bar_callback.print(message)  # keeps the bar intact
        else:
            print(message)


class ProbeCallback(L.Callback):
    """Inverts every block at the checkpoint steps (step 0, the schedule's, the final one), into the training run.

    Each probe goes through the same orchestration as probe.py
    (`lmrep.pipeline.probe_and_report`): results to `<run_dir>/probe/results.jsonl`
    (resumable), plots and report.html into `<run_dir>/probe/` (kept up to date),
    the recovery scalars into the run's loggers at the probed step, and at the end
    of training the charts and reconstructions into its W&B run. So one run holds
    both the loss curve and the invertibility curves.
    """

    def __init__(
        self,
        *,
        num_prompts: int = 4,
        tokens: int = 16,
        prompts: list[str] | None = None,
        blocks: str = "all",
        masks: list[int] | None = None,
        contexts: list[str] | None = None,
        settings: ProbeSettings | None = None,
        schedule: CheckpointSchedule | None = None,
        out_subdir: str = "probe",
    ) -> None:
        """
        Args:
            num_prompts: validation stories used as prompts (when `prompts` is not given).
            tokens: cut each prompt to this many tokens.
            prompts: explicit prompts instead of validation stories.
            blocks: 'all' or a list like '1,4,8'.
            masks: masks m to probe (default [0, 1]).
            contexts: 'prompt' and/or 'padded' (default both).
            settings: how each inversion is run (steps, patience, method, ...; default ProbeSettings()).
            schedule: the steps to probe; default: the schedule of the run's StepCheckpoint,
                so every checkpoint is probed (step 0 and the final step always are).
            out_subdir: results directory inside the run directory.
        """
        self.num_prompts = num_prompts
        self.tokens = tokens
        self.prompts = prompts
        self.plan = ProbePlan(blocks=blocks, masks=masks or [0, 1], contexts=contexts or ["prompt", "padded"],
                              settings=settings or ProbeSettings())
        self.schedule = schedule
        self.out_subdir = out_subdir
        self._probed: set[int] = set()
        # [step, loss] pairs, drawn above the recovery curves; kept in checkpoints across a resume.
        self.losses: dict[str, list[list[float]]] = {"train": [], "val": []}

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses = state_dict.get("losses", self.losses)

    def _schedule(self, trainer: L.Trainer) -> CheckpointSchedule:
        """Its own schedule, else the one of the run's StepCheckpoint."""
        if self.schedule is not None:
            return self.schedule
        for callback in trainer.callbacks:
            if isinstance(callback, StepCheckpoint):
                return callback.schedule
        raise ValueError("ProbeCallback needs a schedule or a StepCheckpoint in trainer.callbacks to follow")

    @rank_zero_only
    def _probe(self, trainer: L.Trainer, pl_module: L.LightningModule, *, final: bool = False) -> None:
        from lmrep.pipeline import TrainerLoggers, probe_and_report
        from lmrep.prompts import encode_prompts
        from lmrep.runs import ModelSource

        step = trainer.global_step
        if step in self._probed and not final:
            return
        new = step not in self._probed
        self._probed.add(step)
        datamodule = trainer.datamodule
        tokenizer = datamodule.tokenizer
        texts = self.prompts or datamodule.validation_texts(self.num_prompts)
        prompts = encode_prompts(texts, tokenizer, max_tokens=self.tokens)
        # The run's own weights at this step: one identity per (run directory, step).
        source = ModelSource(name=f"step={step:06d}", step=step, model=pl_module.model,
                             source_id=f"{trainer.default_root_dir}:{step}")
        outcome = probe_and_report(
            [source], prompts, tokenizer, self.plan, Path(trainer.default_root_dir) / self.out_subdir,
            title=f"{pl_module.model.family} run {trainer.default_root_dir}", losses=self.losses,
            sink=TrainerLoggers(trainer.loggers), log_steps=[step] if new else [], final=final,
            progress=trainer.progress_bar_callback is not None, desc=f"probing step {step}", leave=False)
        if not new:
            return
        best = [s for s in outcome.summary if s["step"] == step and s["mask"] == max(self.plan.masks)]
        line = ", ".join(f"b{s['block']} {s['context']} {s['nonself_acc'] or 0:.2f}" for s in best)
        message = f"[step {step}] probe non-self recovery (m={max(self.plan.masks)}): {line}"
        if trainer.progress_bar_callback is not None:
            trainer.progress_bar_callback.print(message)
        else:
            print(message)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:
            self._probe(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and step % trainer.log_every_n_steps == 0:
            # This batch's loss came from the weights before its update: step - 1, as the loggers have it.
            self.losses["train"].append([step - 1, float(loss)])
        if step in self._schedule(trainer):
            self._probe(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if loss is None or trainer.sanity_checking:
            return
        val = self.losses["val"]
        if val and val[-1][0] == trainer.global_step:  # validated again at a resumed run's first step
            val.pop()
        val.append([trainer.global_step, float(loss)])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._probe(trainer, pl_module, final=True)
