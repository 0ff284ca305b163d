"""The probe command line: invert every block of a checkpoint, a run's checkpoints, or an untrained model.

    python probe.py --checkpoint runs/quickstart/checkpoints --out runs/quickstart/probe
    python probe.py --init configs/mixer_flat.yaml --seed 0 --context padded --mask 0,1 --out out/flat
    python probe.py --checkpoint runs/big/checkpoints --accelerator gpu --devices 4 --out runs/big/probe

Writes results.jsonl, summary.csv/json, PNG curves and heatmaps, report.html and
an (offline unless credentials) W&B run into --out.

With `--devices N` (and `--num-nodes` under SLURM) Lightning Fabric starts one
process per device (DDP; gloo on CPU, NCCL on GPUs); the prompts are split over
them, rank 0 gathers and writes everything once: the rows one process writes
(to floating-point rounding; docs/scaling.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from lmrep.checkpoints import CheckpointError, load_checkpoint
from lmrep.loggers import finish_writing, has_wandb_credentials
from lmrep.probe import CONTEXTS, FREES, LOSSES, METHODS, OPTIMIZERS, ProbeSettings, calibrate_lr
from lmrep.report import summary_table, wandb_charts, wandb_scalars, wandb_table, write_report
from lmrep.runner import (ModelSource, PromptSet, Shard, checkpoint_sources, encode_prompts, parse_blocks,
                          parse_ints, read_prompt_file, run_probe, untrained_source_id, validation_prompts)
from models import build_model, model_class, model_spec


def build_parser() -> argparse.ArgumentParser:
    """All probe flags; the defaults are the engine's measured defaults."""
    p = argparse.ArgumentParser(description="Invert every block of a language model by gradient descent.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", type=Path, help="a checkpoint file, or a directory: every checkpoint in step order")
    what.add_argument("--init", type=Path, metavar="CONFIG.yaml", help="an untrained model built from a training config")
    p.add_argument("--seed", type=int, default=0, help="seed of the untrained model (--init) and of the probe")
    p.add_argument("--prompts", type=Path, help="a file with one prompt per line (default: validation stories)")
    p.add_argument("--num-prompts", type=int, default=8, help="validation stories to use as prompts")
    p.add_argument("--tokens", type=int, default=16, help="cut each validation story to this many tokens")
    p.add_argument("--blocks", default="all", help="'all' or a list like 1,4,8")
    p.add_argument("--mask", default="0,1", help="masks m, e.g. 0,1,3 (m = 0: self only)")
    p.add_argument("--context", default="prompt", help="prompt, padded, or both as prompt,padded")
    p.add_argument("--free", default="all", choices=FREES,
                   help="optimise every position (the source), only the real prompt positions (padding held at "
                        "the pad embedding), or only the masked ones")
    p.add_argument("--steps", type=int, default=500, help="optimisation steps")
    p.add_argument("--method", default="embedding", choices=METHODS)
    p.add_argument("--loss", default="l1", choices=LOSSES)
    p.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    p.add_argument("--lr", type=float, default=None, help="default: measured per model family")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--patience", type=int, default=None,
                   help="retire each inversion once its decode is stable this many steps (100 kept every "
                        "result of a 500-step run in a measurement; default: run all steps)")
    p.add_argument("--max-rows", type=int, default=None,
                   help="solve at most this many rows at once (memory; default: all on a GPU, chunks of "
                        "~2048 positions on a CPU)")
    p.add_argument("--allowed-tokens", type=Path, default=None,
                   help="restrict decoding to the tokens of the words in this text file")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.json; with --checkpoint it must be the one the checkpoint was trained with")
    p.add_argument("--data-dir", type=Path, default=None, help="local TinyStories folder (default: ../shared copy)")
    p.add_argument("--calibrate", action="store_true", help="pick lr from a small grid on block-1 self recovery")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--no-wandb", action="store_true", help="skip the W&B run")
    scale = p.add_argument_group("scaling out (Lightning Fabric, DDP): prompts are split over the processes")
    scale.add_argument("--accelerator", default="cpu", help="cpu, gpu/cuda, or auto (Lightning's names)")
    scale.add_argument("--devices", type=int, default=1, help="processes per node, one per device")
    scale.add_argument("--num-nodes", type=int, default=1, help="nodes (SLURM: srun starts the processes)")
    p.add_argument("--debug", action="store_true", help="full tracebacks on errors")
    return p


def untrained_model(config_path: Path, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model a training config would start from, initialised with `seed`, and the config's data section."""
    if not config_path.is_file():
        raise FileNotFoundError(f"config not found: {config_path}")
    cfg = yaml.safe_load(config_path.read_text())
    try:
        spec = cfg["model"]["model"]
        class_path, config = spec["class_path"], spec["init_args"]["config"]
    except (KeyError, TypeError):
        raise ValueError(f"{config_path} has no model.model.class_path / init_args.config section") from None
    family = model_class(class_path).family
    torch.manual_seed(seed)
    return build_model(family, config), cfg.get("data") or {}


def load_tokenizer_for(args: argparse.Namespace, data_cfg: dict[str, Any]):
    """The tokenizer: --tokenizer, else the one stored in the checkpoint, else the data module's."""
    from data.tokenizer import load_tokenizer, tokenizer_hash

    if args.tokenizer is not None:
        return load_tokenizer(args.tokenizer), tokenizer_hash(args.tokenizer)
    if args.checkpoint is not None:
        first = args.checkpoint
        if first.is_dir():
            from lmrep.checkpoints import list_checkpoints

            first = list_checkpoints(first)[0]
        loaded = load_checkpoint(first)
        if loaded.tokenizer is None:
            raise CheckpointError(f"{first} stores no tokenizer: pass --tokenizer")
        return loaded.tokenizer, loaded.tokenizer_hash
    from data.tinystories import TinyStoriesDataModule

    keep = {k: v for k, v in data_cfg.items() if k in ("source", "data_dir", "cache_dir", "tokenizer_path")}
    if args.data_dir is not None:
        keep["data_dir"] = str(args.data_dir)
    dm = TinyStoriesDataModule(**keep)
    return dm.tokenizer, dm.tokenizer_hash


def log_wandb(rows: list[dict[str, Any]], out_dir: Path, settings: dict[str, Any]) -> None:
    """An offline (unless credentials) W&B run: curves vs training step and a table of reconstructions."""
    import wandb

    mode = "online" if has_wandb_credentials() and os.environ.get("WANDB_MODE") != "offline" else "offline"
    run = wandb.init(project="lmrep", dir=str(out_dir), job_type="probe", name=f"probe-{out_dir.name}",
                     mode=mode, config=settings, reinit="finish_previous")
    run.define_metric("train_step")
    run.define_metric("probe/*", step_metric="train_step")
    summary = summary_table(rows)
    for step in sorted({s["step"] for s in summary}):
        run.log({"train_step": step, **wandb_scalars(summary, step)})
    run.log({**wandb_charts(summary), "reconstructions": wandb_table(rows)})
    run.finish()
    finish_writing()


def launch(args: argparse.Namespace, argv: list[str] | None) -> Any:
    """Start one process per device with Lightning Fabric; None for the plain single CPU process.

    Fabric's DDP launcher starts the other local ranks by re-running this command
    line (under SLURM, srun has started them already), so several processes need
    probe.py run as a command, not `main([...])` from inside another program.
    """
    if args.devices < 1 or args.num_nodes < 1:
        raise ValueError(f"--devices and --num-nodes must be >= 1, got {args.devices} and {args.num_nodes}")
    world = args.devices * args.num_nodes
    if world == 1 and args.accelerator == "cpu":
        return None
    if world > 1 and argv is not None and list(argv) != sys.argv[1:]:
        raise ValueError("--devices/--num-nodes > 1 need probe.py run as a command: Lightning starts the other "
                         "processes by re-running the command line")
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
                    strategy="ddp" if world > 1 else "auto")
    fabric.launch()
    return fabric


def main(argv: list[str] | None = None) -> int:
    """Entry point of probe.py; known faults print one line (full traceback with --debug)."""
    args = build_parser().parse_args(argv)
    try:
        run(args, launch(args, argv))
    except (ValueError, FileNotFoundError, FloatingPointError, CheckpointError) as err:
        if args.debug or os.environ.get("LMREP_DEBUG"):
            raise
        if Shard.current().is_main:  # every rank fails alike; one line is enough
            print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace, fabric: Any = None) -> None:
    """Probe what the arguments name and write every output into --out.

    With a launched `fabric` this runs on every rank: each probes its share of the
    prompts on its device, and rank 0 alone writes the results, report and W&B run.
    """
    shard = Shard.current() if fabric is not None else Shard()
    device = fabric.device if fabric is not None else None
    for flag, value in (("--tokens", args.tokens), ("--num-prompts", args.num_prompts), ("--steps", args.steps)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    contexts = [c.strip() for c in args.context.split(",") if c.strip()]
    bad = [c for c in contexts if c not in CONTEXTS]
    if bad or not contexts:
        raise ValueError(f"unknown context {','.join(bad) or args.context!r}: choose prompt, padded or prompt,padded")
    masks = parse_ints(args.mask, "masks")
    data_cfg: dict[str, Any] = {}
    if args.init is not None:
        model, data_cfg = untrained_model(args.init, args.seed)
        sources = [ModelSource(name=f"init-seed{args.seed}", step=0, model=model,
                               source_id=untrained_source_id(model_spec(model), args.seed))]
    else:
        sources = checkpoint_sources(args.checkpoint)
    if fabric is not None:
        with fabric.rank_zero_first(local=True):  # a tokenizer to train is trained once per node
            tokenizer, tok_hash = load_tokenizer_for(args, data_cfg)
    else:
        tokenizer, tok_hash = load_tokenizer_for(args, data_cfg)
    texts = read_prompt_file(args.prompts) if args.prompts else validation_prompts(args.num_prompts, args.data_dir)
    prompts: PromptSet = encode_prompts(texts, tokenizer, max_tokens=None if args.prompts else args.tokens)
    allowed = None
    if args.allowed_tokens is not None:
        allowed = sorted(set(tokenizer.encode(args.allowed_tokens.read_text(encoding="utf-8"))))
    settings = ProbeSettings(method=args.method, loss=args.loss, optimizer=args.optimizer, lr=args.lr,
                             steps=args.steps, free=args.free, top_k=args.top_k, seed=args.seed,
                             patience=args.patience, max_rows=args.max_rows, allowed_tokens=allowed)
    first_model = sources[0].load(tok_hash)
    parse_blocks(args.blocks, first_model.n_blocks)  # fail before any work
    if prompts.ids.shape[1] > first_model.context_length:
        raise ValueError(f"prompt of {prompts.ids.shape[1]} tokens is longer than the model's context length "
                         f"{first_model.context_length}")
    if args.calibrate:
        lr = None
        if shard.is_main:  # one choice for every rank, even where devices round differently
            model = first_model if device is None else first_model.to(device)
            lr, scores = calibrate_lr(model, prompts.ids, settings=settings,
                                      pad_token_id=tokenizer.pad_token_id, prompt_lengths=prompts.lengths)
            print(f"calibrated lr {lr} (block-1 self recovery by lr: {scores})")
        settings.lr = shard.broadcast(lr)
    rows = run_probe(sources, prompts, tokenizer, blocks_spec=args.blocks, masks=masks, settings=settings,
                     contexts=contexts, out_dir=args.out, tokenizer_hash=tok_hash, shard=shard, device=device)
    if not shard.is_main:
        return
    title = f"{rows[0]['family']} ({args.checkpoint or args.init})"
    files = write_report(rows, args.out, title=title)
    if not args.no_wandb:
        log_wandb(rows, args.out, settings.as_record())
    for s in summary_table(rows):
        nonself = "" if s["nonself_acc"] is None else f" non-self {s['nonself_acc']:.2f}"
        print(f"step {s['step']:>6} {s['context']:>6} block {s['block']} m={s['mask']}: "
              f"self {s['self_acc']:.2f}{nonself} ratio {s['distance_ratio']:.2f}")
    print(f"report: {files['report']}")
