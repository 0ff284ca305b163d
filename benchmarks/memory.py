"""Peak memory (RSS, from the OS) of probing one checkpoint and of training.

Every measurement runs in a fresh subprocess (this script with `--child`), which
reports its own `getrusage(RUSAGE_SELF).ru_maxrss` at exit; the parent also
reads `RUSAGE_CHILDREN`. A `baseline` child imports the same libraries, loads
the tokenizer and builds the model without doing any work, so the cost of the
work itself is the difference. The probe child probes all blocks for 32 prompts
(masks 0 and 1) for a few steps (memory does not grow with steps); the train
child runs a few Trainer steps of the LightningModule (no logger: W&B runs in
its own process).

    python benchmarks/memory.py
    python benchmarks/memory.py --checkpoint runs/quickstart/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    DEFAULT_CACHE, data_module, default_out, make_model, own_peak_rss_kib, peak_rss_mib_of, print_table,
    validation_prompt_ids, write_json,
)

SCRIPT = Path(__file__).resolve()


def child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints MAXRSS_KIB <n>."""
    import lightning as L

    from lmrep.checkpoints import load_checkpoint
    from lmrep.module import LanguageModelModule
    from lmrep.probe import ProbeSettings, probe

    dm = data_module(args.cache_dir, args.context, args.batch)
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint).model
    else:
        model = make_model(args.family, args.d, args.blocks, args.context, seed=0)
    prompts = validation_prompt_ids(dm, args.prompts, args.prompt_len)
    if args.child.startswith("probe"):
        context = args.child.split("-", 1)[1]
        settings = ProbeSettings(context=context, steps=args.steps, max_rows=args.max_rows)
        probe(model.eval(), prompts, blocks=list(range(1, model.n_blocks + 1)), masks=[0, 1], settings=settings,
              pad_token_id=dm.pad_token_id)
    elif args.child == "train":
        module = LanguageModelModule(model, warmup_steps=1)
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                                num_sanity_val_steps=0, gradient_clip_val=1.0, default_root_dir=tmp)
            trainer.fit(module, datamodule=dm)
    print(f"MAXRSS_KIB {own_peak_rss_kib()}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["mixer", "llama"], choices=["mixer", "llama"])
    p.add_argument("--family", default="mixer", help=argparse.SUPPRESS)  # set per child
    p.add_argument("--checkpoint", default=None, help="probe/train this checkpoint instead of untrained models")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="probe / training steps in each child")
    p.add_argument("--max-rows", type=int, default=None, help="engine chunk size for the probe children")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--child", default=None, choices=["baseline", "probe-prompt", "probe-padded", "train"],
                   help=argparse.SUPPRESS)
    p.add_argument("--out", default=default_out("memory"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Measure every (family, task) in its own subprocess, print the table, write the JSON."""
    args = parse_args(argv)
    if args.child:
        child(args)
        return None
    data_module(args.cache_dir, args.context, args.batch)  # tokenize once, outside the measurements
    common = ["--d", str(args.d), "--blocks", str(args.blocks), "--context", str(args.context), "--batch",
              str(args.batch), "--prompts", str(args.prompts), "--prompt-len", str(args.prompt_len), "--steps",
              str(args.steps), "--cache-dir", args.cache_dir]
    if args.max_rows:
        common += ["--max-rows", str(args.max_rows)]
    if args.checkpoint:
        common += ["--checkpoint", args.checkpoint]
    families = ["checkpoint"] if args.checkpoint else args.families
    rows = []
    for family in families:
        baseline = None
        for task in ("baseline", "probe-prompt", "probe-padded", "train"):
            argv_child = [sys.executable, str(SCRIPT), "--child", task, "--family", family, *common]
            mib, _ = peak_rss_mib_of(argv_child)
            baseline = mib if task == "baseline" else baseline
            rows.append({"model": family, "task": task, "peak_rss_mib": mib,
                         "above_baseline_mib": mib - baseline if baseline is not None else None})
    print_table(rows, ["model", "task", "peak_rss_mib", "above_baseline_mib"],
                title=f"peak RSS (fresh process each; d={args.d}, {args.blocks} blocks, L={args.context}; probe: "
                      f"{args.prompts} prompts x {args.prompt_len} tokens, all blocks, masks 0 1; train: batch "
                      f"{args.batch})")
    payload = {"benchmark": "memory", "args": vars(args), "rows": rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
