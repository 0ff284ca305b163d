"""How probe time grows: with the number of prompts, and with the number of blocks probed.

A fixed number of inversion steps (no early stopping, so every run does the
same steps and only the batch changes), on one untrained model. Prompts sweep
at all blocks; blocks sweep probes blocks 1..k at a fixed prompt count. Each
row reports seconds, seconds per prompt, and the analytical FLOP rate: the
engine runs every row through its own k blocks, so the work of probing blocks
1..k is proportional to 1 + 2 + ... + k, and time should follow that sum
(and be linear in prompts), at a roughly constant FLOP rate.

    python benchmarks/scaling.py
    python benchmarks/scaling.py --family llama --context-mode padded --max-rows 128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    DEFAULT_CACHE, data_module, default_out, make_model, matmul_gflops, print_table, probe_flops_per_step,
    validation_prompt_ids, write_json,
)
from lmrep.probe import ProbeSettings, probe  # noqa: E402


def time_probe(model: Any, prompts: torch.Tensor, blocks: list[int], args: argparse.Namespace,
               pad: int) -> dict[str, Any]:
    """Seconds and FLOP rate of one probe call (best of --repeats)."""
    settings = ProbeSettings(context=args.context_mode, steps=args.steps, max_rows=args.max_rows, seed=args.seed)
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        probe(model, prompts, blocks=blocks, masks=args.masks, settings=settings, pad_token_id=pad)
        best = min(best, time.perf_counter() - start)
    t_ctx = model.context_length if args.context_mode == "padded" else prompts.shape[1]
    flops = probe_flops_per_step(model, t_ctx, blocks, len(args.masks) * prompts.shape[0]) * args.steps
    return {"seconds": best, "seconds_per_prompt": best / prompts.shape[0], "gflops_per_s": flops / best / 1e9,
            "block_units": sum(blocks)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="mixer", choices=["mixer", "llama"])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--prompt-counts", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--block-counts", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--fixed-prompts", type=int, default=32, help="prompts of the blocks sweep")
    p.add_argument("--masks", type=int, nargs="+", default=[0, 1])
    p.add_argument("--context-mode", default="prompt", choices=["prompt", "padded"])
    p.add_argument("--steps", type=int, default=10, help="inversion steps per run (time is linear in them)")
    p.add_argument("--max-rows", type=int, default=None, help="engine chunk size (bounds memory)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=default_out("scaling"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both sweeps, print the tables, write the JSON; returns the payload."""
    args = parse_args(argv)
    dm = data_module(args.cache_dir, args.context)
    prompts = validation_prompt_ids(dm, max(*args.prompt_counts, args.fixed_prompts), args.prompt_len)
    model = make_model(args.family, args.d, args.blocks, args.context, seed=args.seed).eval()
    pad = dm.pad_token_id
    peak = matmul_gflops()
    all_blocks = list(range(1, model.n_blocks + 1))
    by_prompts = [{"prompts": n, "blocks": len(all_blocks), **time_probe(model, prompts[:n], all_blocks, args, pad)}
                  for n in args.prompt_counts]
    by_blocks = [{"prompts": args.fixed_prompts, "blocks": k,
                  **time_probe(model, prompts[: args.fixed_prompts], list(range(1, k + 1)), args, pad)}
                 for k in args.block_counts if k <= model.n_blocks]
    for rows in (by_prompts, by_blocks):
        base = rows[0]
        for row in rows:
            row["time_ratio"] = row["seconds"] / base["seconds"]
            row["work_ratio"] = (row["prompts"] * row["block_units"]) / (base["prompts"] * base["block_units"])
            row["utilisation"] = row["gflops_per_s"] / peak
    columns = ["prompts", "blocks", "block_units", "seconds", "seconds_per_prompt", "time_ratio", "work_ratio",
               "gflops_per_s", "utilisation"]
    head = (f"{args.family} d={args.d}, {args.context_mode} context, masks {args.masks}, {args.steps} steps "
            f"(matmul peak {peak:.0f} GFLOP/s)")
    print_table(by_prompts, columns, title=f"probe time vs prompts, blocks 1..{model.n_blocks}: {head}")
    print_table(by_blocks, columns, title=f"probe time vs blocks probed (1..k), {args.fixed_prompts} prompts: {head}")
    payload = {"benchmark": "scaling", "args": vars(args), "matmul_gflops": peak, "by_prompts": by_prompts,
               "by_blocks": by_blocks}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
