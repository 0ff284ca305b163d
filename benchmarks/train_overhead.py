"""Training throughput: lmrep's LightningModule under the Trainer vs a plain PyTorch loop.

Both run the same optimisation (AdamW with the module's parameter groups,
warm-up then cosine, gradient clipping 1.0) on the same model (same seed) and
the same batches (the data module's seeded train loader), alternating
plain / Lightning `--repeats` times in one process so the ratio holds on a
shared machine. The Lightning run has the real callbacks of configs/llama.yaml
minus sample generations (StepCheckpoint, TokensPerSecond, LearningRateMonitor),
the W&B logger (offline), logging every 10 steps, no progress bar and no
validation. Timing starts at the `--warmup`-th batch and covers whole steps
(batch fetch, step, callbacks, logging) in both runs.

Also reported: the model FLOP utilisation of each (analytical FLOPs, see
benchmarks/common.py, over the fp32 matmul peak measured in the same run),
the cost of the data loader alone, and the mean of the logged
`train/tokens_per_sec` next to the measured throughput.

    python benchmarks/train_overhead.py
    python benchmarks/train_overhead.py --families mixer --d 128 --blocks 4   # the quickstart model
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    DEFAULT_CACHE, adamw_like_module, data_module, default_out, make_model, matmul_gflops, print_table,
    train_flops_per_token, train_lr, write_json,
)
from lmrep.callbacks import TokensPerSecond  # noqa: E402
from lmrep.checkpoints import CheckpointSchedule, StepCheckpoint  # noqa: E402
from lmrep.loggers import RunLogger  # noqa: E402
from lmrep.module import LanguageModelModule, next_token_loss, warmup_cosine  # noqa: E402

WARMUP_STEPS = 100  # configs' warm-up; only the lr values depend on it, not the cost
CHECKPOINT_EVERY = 250  # configs/llama.yaml
LOG_EVERY = 10  # configs/llama.yaml


class StepClock(L.Callback):
    """Timestamps at batch starts (after the batch is fetched), and the logged tokens/s."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.logged: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        value = trainer.callback_metrics.get("train/tokens_per_sec")
        if value is not None and batch_idx > 0:
            self.logged.append(float(value))


def tokens_per_second(starts: list[float], warmup: int, tokens_per_step: int) -> float:
    """Throughput over whole steps warmup .. len(starts)-1 (batch start to batch start)."""
    steps = len(starts) - 1 - warmup
    return tokens_per_step * steps / (starts[-1] - starts[warmup])


def run_plain(family: str, args: argparse.Namespace, dm: Any) -> dict[str, Any]:
    """The plain loop over the same DataLoader; tokens/s."""
    model = make_model(family, args.d, args.blocks, args.context, seed=args.seed)
    model.train()
    opt = adamw_like_module(model, train_lr(family))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(WARMUP_STEPS, args.steps, 0.1))
    starts: list[float] = []
    loader = iter(dm.train_dataloader())
    for _ in range(args.steps):
        batch = next(loader)
        starts.append(time.perf_counter())
        loss, _ = next_token_loss(model(batch["input_ids"]), batch["labels"])
        if not torch.isfinite(loss):  # the module checks too
            raise FloatingPointError("training loss became non-finite")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return {"tokens_per_s": tokens_per_second(starts, args.warmup, args.batch * args.context)}


def run_lightning(family: str, args: argparse.Namespace, dm: Any, variant: str) -> dict[str, Any]:
    """The LightningModule under the Trainer; `variant` full | no_logger | no_callbacks | bare."""
    model = make_model(family, args.d, args.blocks, args.context, seed=args.seed)
    module = LanguageModelModule(model, lr=train_lr(family), warmup_steps=WARMUP_STEPS)
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="lmrep-bench-") as tmp:
        callbacks: list[L.Callback] = [clock]
        if variant in ("full", "no_logger"):
            callbacks += [StepCheckpoint(dirpath=str(Path(tmp) / "checkpoints"),
                                         schedule=CheckpointSchedule(every=CHECKPOINT_EVERY)),
                          TokensPerSecond()]
            if variant == "full":
                callbacks.append(LearningRateMonitor(logging_interval="step"))
        logger: Any = RunLogger(save_dir=tmp) if variant in ("full", "no_callbacks") else False
        trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, precision="32-true",
                            logger=logger, callbacks=callbacks, enable_progress_bar=False,
                            enable_model_summary=False, log_every_n_steps=LOG_EVERY, gradient_clip_val=1.0,
                            limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=variant != "bare"
                            and variant != "no_callbacks", default_root_dir=tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, datamodule=dm)
        if logger:
            logger.experiment.finish()
    out = {"tokens_per_s": tokens_per_second(clock.starts, args.warmup, args.batch * args.context)}
    if clock.logged:
        out["logged_tokens_per_s"] = statistics.mean(clock.logged[args.warmup:] or clock.logged)
    return out


def step_part_costs(family: str, args: argparse.Namespace, repeats: int = 3) -> dict[str, float]:
    """Seconds of the parts changed in lmrep/module.py, old vs new, interleaved (best of `repeats`)."""
    model = make_model(family, args.d, args.blocks, args.context, seed=args.seed)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimisers = {"adamw_unfused": adamw_like_module(model, 1e-3, fused=False),
                  "adamw_fused": adamw_like_module(model, 1e-3, fused=True)}
    logits = torch.randn(args.batch, args.context, model.config.vocab_size, requires_grad=True)
    labels = torch.randint(0, model.config.vocab_size, (args.batch, args.context))

    def sliced_loss() -> torch.Tensor:  # the previous next_token_loss: slices (and copies) the logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)

    parts = {**{name: opt.step for name, opt in optimisers.items()},
             "loss_sliced_logits": lambda: sliced_loss().backward(),
             "loss_shifted_labels": lambda: next_token_loss(logits, labels)[0].backward()}
    best = {name: float("inf") for name in parts}
    for _ in range(repeats):
        for name, fn in parts.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def loader_cost(dm: Any, n: int) -> float:
    """Seconds per batch of the train DataLoader alone (datasets -> torch formatting, collate)."""
    loader = iter(dm.train_dataloader())
    next(loader)
    start = time.perf_counter()
    for _ in range(n):
        next(loader)
    return (time.perf_counter() - start) / n


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["mixer", "llama"], choices=["mixer", "llama"])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30, help="steps per run")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    p.add_argument("--repeats", type=int, default=2, help="alternations plain / Lightning")
    p.add_argument("--attribute", action="store_true",
                   help="also run Lightning without the logger, without callbacks, and bare")
    p.add_argument("--max-train-stories", type=int, default=None)
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=default_out("train_overhead"))
    args = p.parse_args(argv)
    if args.steps < args.warmup + 2:
        p.error("--steps must be at least --warmup + 2")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison, print the table, write the JSON; returns the payload."""
    args = parse_args(argv)
    dm = data_module(args.cache_dir, args.context, args.batch, args.max_train_stories)
    peaks = [matmul_gflops()]
    variants = ["full"] + (["no_logger", "no_callbacks", "bare"] if args.attribute else [])
    rows = []
    for family in args.families:
        runs: dict[str, list[dict[str, Any]]] = {"plain": []}
        for _ in range(args.repeats):
            runs["plain"].append(run_plain(family, args, dm))
            for variant in variants:
                runs.setdefault(variant, []).append(run_lightning(family, args, dm, variant))
        peaks.append(matmul_gflops())
        parts = step_part_costs(family, args)
        flops_per_token = train_flops_per_token(make_model(family, args.d, args.blocks, args.context), args.context)
        best_plain = max(r["tokens_per_s"] for r in runs["plain"])
        for name, results in runs.items():
            best = max(r["tokens_per_s"] for r in results)
            logged = [r["logged_tokens_per_s"] for r in results if "logged_tokens_per_s" in r]
            rows.append({"family": family, "runner": "plain" if name == "plain" else f"lightning/{name}",
                         "tokens_per_s": best, "all_tokens_per_s": [r["tokens_per_s"] for r in results],
                         "overhead": best_plain / best - 1, "logged_tokens_per_s": max(logged) if logged else None,
                         "gflops_per_s": best * flops_per_token / 1e9, "step_parts_seconds": parts})
    peak = max(peaks)
    for row in rows:
        row["utilisation"] = row["gflops_per_s"] / peak
    loader_s = loader_cost(dm, 20)
    print_table([{"family": r["family"], **r["step_parts_seconds"]} for r in rows if r["runner"] == "plain"],
                ["family", *rows[0]["step_parts_seconds"]], title="seconds per step part, before vs after")
    print_table(rows, ["family", "runner", "tokens_per_s", "overhead", "logged_tokens_per_s", "gflops_per_s",
                       "utilisation"],
                title=f"training d={args.d}, {args.blocks} blocks, L={args.context}, batch {args.batch} "
                      f"(best of {args.repeats}; matmul peak {peak:.0f} GFLOP/s; "
                      f"data loader alone {1000 * loader_s:.1f} ms/batch)")
    payload = {"benchmark": "train_overhead", "args": vars(args), "matmul_gflops": peak, "matmul_samples": peaks,
               "loader_seconds_per_batch": loader_s, "rows": rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
