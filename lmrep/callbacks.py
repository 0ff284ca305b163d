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
    """Logs training throughput (`train/tokens_per_sec`) measured between batch ends."""

    def __init__(self) -> None:
        self._last: float | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict[str, Tensor], batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last is not None:
            tokens = batch["input_ids"].numel() * trainer.world_size
            pl_module.log("train/tokens_per_sec", tokens / (now - self._last), prog_bar=True)
        self._last = now

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None  # validation time is not training time

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None


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
        message = f"[step {step}] {prompt} ->{text!r}"
        if trainer.progress_bar_callback is not None:
            trainer.progress_bar_callback.print(message)  # keeps the bar intact
        else:
            print(message)
