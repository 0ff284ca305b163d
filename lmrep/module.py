"""The LightningModule shared by every model family: loss, optimiser, one step.

The model is passed in (any `models/` family); this module owns the next-token
loss (never counted on padding), AdamW with warm-up then cosine decay, and the
checkpoint metadata that lets a checkpoint rebuild its model and name the
tokenizer it was trained with.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from data.tinystories import IGNORE_INDEX
from lmrep.checkpoints import CHECKPOINT_KEY, check_resume, checkpoint_metadata
from models import SurfaceModel

FUSED_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW kernel


def next_token_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy of predicting labels[:, 1:] from logits[:, :-1], and the token count."""
    # Shift the labels, not the logits: slicing logits[:, :-1] would copy the whole (b, t, vocab)
    # tensor (the largest in the step) to make it contiguous; the last position is ignored instead.
    ignored = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    targets = torch.cat([labels[:, 1:], ignored], dim=1)  # (b, t)
    n_tokens = targets.ne(IGNORE_INDEX).sum()
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),  # (b*t, vocab), a view
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    return loss, n_tokens


def weight_decay_groups(model: SurfaceModel) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed) trainable parameters: matrices decay; biases, norms and the embedding do not."""
    # The embedding is found by identity, not by parameter name: every family names it its own way, and
    # a tied LM head is this same tensor (parameters() lists a shared tensor once).
    embedding = model.embedding_matrix
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and p is not embedding else no_decay).append(p)
    return decay, no_decay


class LanguageModelModule(L.LightningModule):
    """Causal language modelling of any lmrep model family."""

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
    ) -> None:
        """
        Args:
            model: a model family from `models/` (mixer or llama), built from its config.
            lr: peak AdamW learning rate, reached after the warm-up.
            weight_decay: AdamW weight decay on matrices (not on biases, norms or embeddings).
            betas: AdamW betas.
            warmup_steps: linear warm-up from 0 to `lr` over this many optimiser steps.
            min_lr_ratio: cosine decay ends at `lr * min_lr_ratio` at the run's last step.
        """
        super().__init__()
        if not lr > 0:  # also refuses nan
            raise ValueError(f"lr must be positive, got {lr}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.model = model
        self.save_hyperparameters(ignore=["model"])
        self.val_loss = MeanMetric()
        self.last_val_step: int | None = None  # step of the last validation in this process
        # Set from the data module at fit time; checked against a resumed checkpoint.
        self.tokenizer_hash: str | None = None
        self.tokenizer_json: str | None = None

    def forward(self, ids: Tensor) -> Tensor:
        """Token ids (b, t) -> logits (b, t, vocab)."""
        return self.model(ids)

    def _shared_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits = self.model(batch["input_ids"])  # (b, t, vocab)
        return next_token_loss(logits, batch["labels"])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self._shared_step(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {self.global_step}")
        # Under DDP each rank's loss is the mean over its shard; sync_dist logs their mean, the
        # global batch's loss (rows hold equal token counts when packed): one scalar all-reduce.
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, n_tokens = self._shared_step(batch)
        # Token-weighted, so the epoch value is the exact per-token loss (also under DDP).
        self.val_loss.update(loss, weight=n_tokens)

    def on_validation_epoch_end(self) -> None:
        value = self.val_loss.compute()
        self.val_loss.reset()
        # Progress bar and callback_metrics only: Lightning would log it at the step before the
        # update that produced these weights (99, not 100); the loggers get the weights' own step.
        self.log("val/loss", value, prog_bar=True, logger=False, sync_dist=False)
        if self.trainer.sanity_checking:
            return
        for logger in self.loggers:
            logger.log_metrics({"val/loss": float(value)}, step=self.global_step)
        self.last_val_step = self.global_step

    def on_train_start(self) -> None:
        """Validate the weights training starts from: step 0 before any update, or a resumed run's step.

        A checkpoint is written before the validation of its step, so a resumed run
        would otherwise have no validation point at the step it resumes from.
        """
        trainer = self.trainer
        if not trainer.enable_validation or self.last_val_step == self.global_step:
            return
        # What Lightning's training epoch loop does around its own validation runs (lightning<2.7).
        trainer.validating = True
        first_loop_iter = trainer._logger_connector._first_loop_iter
        trainer.fit_loop.epoch_loop.val_loop.run()
        trainer.training = True
        trainer._logger_connector._first_loop_iter = first_loop_iter

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = weight_decay_groups(self.model)
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
            # One fused kernel per parameter instead of ~10 elementwise passes: the same AdamW
            # update, measured 7x faster per optimiser step on CPU (benchmarks/RESULTS.md).
            fused=all(p.device.type in FUSED_DEVICES for p in decay + no_decay),
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = warmup_cosine(hp.warmup_steps, total, hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self.tokenizer_hash = datamodule.tokenizer_hash
            self.tokenizer_json = datamodule.tokenizer_file.read_text(encoding="utf-8")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = checkpoint_metadata(
            self.model, step=self.global_step, tokenizer_hash=self.tokenizer_hash, tokenizer_json=self.tokenizer_json
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_resume("the checkpoint", checkpoint.get(CHECKPOINT_KEY, {}), tokenizer_hash=self.tokenizer_hash,
                     model=self.model)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR multiplier: linear warm-up to 1, then cosine decay to `min_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
