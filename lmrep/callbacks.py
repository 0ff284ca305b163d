"""Callbacks for the non-essential: throughput and sample generations."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor


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
    """Inverts every block at step 0 and at checkpoint steps, into the training run.

    Results go to `<run_dir>/probe/results.jsonl` (resumable like probe.py's), the
    recovery curves into the run's W&B logger, and at the end of training the
    plots and report.html into `<run_dir>/probe/`. So one run holds both the loss
    curve and the invertibility curves.
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
        steps: int = 500,
        patience: int | None = None,
        every_n_train_steps: int | None = None,
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
            steps: optimisation steps per inversion.
            patience: stop an inversion early once decodes are stable this many steps.
            every_n_train_steps: probe every this many steps; default: the checkpoint interval.
            out_subdir: results directory inside the run directory.
        """
        self.num_prompts = num_prompts
        self.tokens = tokens
        self.prompts = prompts
        self.blocks = blocks
        self.masks = masks or [0, 1]
        self.contexts = contexts or ["prompt", "padded"]
        self.steps = steps
        self.patience = patience
        self.every_n_train_steps = every_n_train_steps
        self.out_subdir = out_subdir
        self._probed: set[int] = set()
        # [step, loss] pairs, drawn above the recovery curves; kept in checkpoints across a resume.
        self.losses: dict[str, list[list[float]]] = {"train": [], "val": []}

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses = state_dict.get("losses", self.losses)

    def _interval(self, trainer: L.Trainer) -> int:
        if self.every_n_train_steps is not None:
            return self.every_n_train_steps
        from lmrep.checkpoints import StepCheckpoint

        for callback in trainer.callbacks:
            if isinstance(callback, StepCheckpoint) and callback._every_n_train_steps:
                return callback._every_n_train_steps
        raise ValueError("ProbeCallback needs every_n_train_steps or a StepCheckpoint to follow")

    def _out_dir(self, trainer: L.Trainer):
        from pathlib import Path

        return Path(trainer.default_root_dir) / self.out_subdir

    @rank_zero_only
    def _probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lmrep.probe import ProbeSettings
        from lmrep.report import summary_table, wandb_scalars
        from lmrep.prompts import encode_prompts
        from lmrep.runs import ModelSource, run_probe

        step = trainer.global_step
        if step in self._probed:
            return
        self._probed.add(step)
        datamodule = trainer.datamodule
        tokenizer = datamodule.tokenizer
        texts = self.prompts or datamodule.validation_texts(self.num_prompts)
        prompts = encode_prompts(texts, tokenizer, max_tokens=self.tokens)
        settings = ProbeSettings(steps=self.steps, patience=self.patience)
        # The run's own weights at this step: one identity per (run directory, step).
        source = ModelSource(name=f"step={step:06d}", step=step, model=pl_module.model,
                             source_id=f"{trainer.default_root_dir}:{step}")
        rows = run_probe([source], prompts, tokenizer, blocks_spec=self.blocks, masks=self.masks,
                         settings=settings, contexts=self.contexts, out_dir=self._out_dir(trainer), progress=False)
        summary = summary_table([r for r in rows if r["step"] == step])
        for logger in trainer.loggers:
            logger.log_metrics(wandb_scalars(summary, step), step=step)
        best = [s for s in summary if s["mask"] == max(self.masks)]
        line = ", ".join(f"b{s['block']} {s['context']} {s['nonself_acc'] or 0:.2f}" for s in best)
        message = f"[step {step}] probe non-self recovery (m={max(self.masks)}): {line}"
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
            self.losses["train"].append([step, float(loss)])
        if step % self._interval(trainer) == 0:
            self._probe(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if loss is not None and not trainer.sanity_checking:
            self.losses["val"].append([trainer.global_step, float(loss)])

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lmrep.report import summary_table, wandb_charts, wandb_table, write_report
        from lmrep.runs import read_results

        self._probe(trainer, pl_module)
        rows = read_results(self._out_dir(trainer))
        if not rows:
            return
        write_report(rows, self._out_dir(trainer), title=f"{pl_module.model.family} run {trainer.default_root_dir}",
                     losses=self.losses)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.log({**wandb_charts(summary_table(rows)), "probe/reconstructions": wandb_table(rows)})
