"""Exact identifiability vs gradient-descent inversion on the same rows, in one run.

For each model (flat mixer, llama; untrained, and with `--train-steps` briefly
trained on TinyStories) and each context (prompt, padded), the same prompts,
all blocks and masks {0, 1} are probed by:

- `gd`: the gradient solver at the engine's defaults (Adam, 500 steps, the
  family's probe lr);
- `exact`: the exact solver (all blocks in one candidate pass, the family's
  fast path);
and the self rows alone (m = 0) by `gd self`, `exact self` and, with the
generic fallback of `SurfaceModel.candidate_states`, `fallback self`. Printed
side by side: seconds, the exact / gd ratios, the fast path's speed-up over the
fallback, and the share of positions in each class of `lmrep.ceiling`
(recovered / missed / lost / tie). `--scaling` adds how the exact self pass
grows with prompt length, vocabulary (allowed tokens) and depth.

    python benchmarks/exact_vs_gd.py                     # small: d 64, 4 blocks, ~3 min on 2 cores
    python benchmarks/exact_vs_gd.py --d 256 --blocks 8 --prompts 4 --tokens 32 --train-steps 200 --scaling \
        --no-fallback --families mixer    # 38 min on 2 cores (RESULTS.md 9b); llama with 2 prompts: 30 min
    python benchmarks/exact_vs_gd.py --device cuda --d 256 --blocks 8 --prompts 8 --tokens 32
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    DEFAULT_CACHE, cycle, data_module, default_out, make_model, print_table, synchronize,
    train_lr, train_plain, validation_prompt_ids, write_json,
)
from lmrep import ceiling  # noqa: E402
from lmrep.probe import ExactSolver, ProbeSettings, probe  # noqa: E402

PAD = 1  # the pad id of random prompts (the tokenizer's, with --train-steps)
MASKS = [0, 1]


def timed(model: nn.Module, ids: Tensor, device: str, **kw: Any) -> tuple[float, list[dict[str, Any]]]:
    """Seconds of one probe call and its rows (with the keys `lmrep.ceiling` pairs on)."""
    synchronize(device)
    start = time.perf_counter()
    result = probe(model, ids, **kw)
    synchronize(device)
    seconds = time.perf_counter() - start
    rows = result.rows()
    print(f"  {kw['settings'].method} {kw['settings'].context} masks {kw['masks']}: {ids.shape[0]} prompts, "
          f"{len(rows)} rows, {seconds:.1f} s", flush=True)
    for row in rows:
        row.update(step=0, source_id="model", context=kw["settings"].context)
    return seconds, rows


def compare(model: nn.Module, ids: Tensor, context: str, device: str, pad: int, fallback: int | None,
            gd_steps: int | None = None) -> dict[str, Any]:
    """One model and context: every runner on the same rows, the seconds and the class shares.

    `fallback`: how many of the prompts the generic fallback's self pass runs on (None: none), timed beside
    the fast path on the same prompts (the fallback re-runs every block for every candidate: at d 256 and
    8 blocks not timed, estimated at half an hour per family on 2 cores even for one prompt per cell)."""
    blocks = list(range(1, model.n_blocks + 1))
    gd = ProbeSettings(context=context) if gd_steps is None else ProbeSettings(context=context, steps=gd_steps)
    exact = ProbeSettings(method="exact", context=context)
    common = dict(blocks=blocks, pad_token_id=pad)
    out: dict[str, Any] = {}
    # GD solves every row on its own, so its time over masks {0, 1} is the sum of its self (m = 0) and
    # m = 1 calls. The exact solver's self pass serves every mask of a prompt at once: it is timed over
    # masks {0, 1} in one call, and its self rows alone in another.
    out["gd self"], gd_rows = timed(model, ids, device, masks=[0], settings=gd, **common)
    gd_nonself, more = timed(model, ids, device, masks=MASKS[1:], settings=gd, **common)
    out["gd"], gd_rows = out["gd self"] + gd_nonself, gd_rows + more
    out["exact"], exact_rows = timed(model, ids, device, masks=MASKS, settings=exact, solver=ExactSolver(pad),
                                     **common)
    out["exact self"], fast_rows = timed(model, ids, device, masks=[0], settings=exact, solver=ExactSolver(pad),
                                         **common)
    if fallback is not None:
        few = ids[:fallback]
        out["fallback prompts"] = few.shape[0]
        out["fast self (same)"], fast_rows = timed(model, few, device, masks=[0], settings=exact,
                                                   solver=ExactSolver(pad), **common)
        out["fallback self"], slow_rows = timed(model, few, device, masks=[0], settings=exact,
                                                solver=ExactSolver(pad, fast=False), **common)
        out["fast == fallback"] = all(a["recovered_ids"] == b["recovered_ids"] and a["true_rank"] == b["true_rank"]
                                      for a, b in zip(fast_rows, slow_rows))
    counts = ceiling.class_counts(gd_rows + exact_rows)
    for region in ceiling.REGIONS:
        total = sum(c[f"{region}_{k}"] for c in counts for k in ceiling.CLASSES)
        for k in ceiling.CLASSES:
            out[f"{region} {k}"] = sum(c[f"{region}_{k}"] for c in counts) / total if total else None
    return out


def scaling(model: nn.Module, ids: Tensor, device: str, pad: int) -> list[dict[str, Any]]:
    """Seconds of the exact self pass (m = 0, prompt context) as prompt length, vocabulary and depth grow."""
    vocab = model.embedding_matrix.shape[0]
    n, t = model.n_blocks, ids.shape[1]
    exact = ProbeSettings(method="exact")
    cases = [("tokens", t // 2, vocab, n), ("tokens", t, vocab, n), ("vocab", t, vocab // 4, n),
             ("vocab", t, vocab, n), ("depth", t, vocab, max(1, n // 2)), ("depth", t, vocab, n)]
    rows = []
    for axis, tokens, v, depth in cases:
        settings = dataclasses.replace(exact, allowed_tokens=None if v == vocab else list(range(v)))
        seconds, _ = timed(model, ids[:, :tokens], device, blocks=list(range(1, depth + 1)), masks=[0],
                           settings=settings, pad_token_id=pad, solver=ExactSolver(pad))
        rows.append({"axis": axis, "tokens": tokens, "vocab": v, "blocks": depth, "seconds": seconds})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="mixer,llama")
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--context", type=int, default=64, help="the models' context length (padded context)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=0, help="also probe each model after this much training")
    parser.add_argument("--gd-steps", type=int, default=None, help="gradient steps (default: the engine's)")
    parser.add_argument("--no-fallback", action="store_true", help="skip the generic-fallback self pass")
    parser.add_argument("--fallback-prompts", type=int, default=None,
                        help="run the generic fallback (and the fast path beside it) on the first N prompts only "
                             "(default: all)")
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    parser.add_argument("--out", default=default_out("exact_vs_gd"))
    args = parser.parse_args(argv)

    pad, dm = PAD, None
    if args.train_steps:
        dm = data_module(args.cache_dir, context_length=args.context, batch_size=16)
        pad = dm.tokenizer.pad_token_id
        ids = validation_prompt_ids(dm, args.prompts, args.tokens)
    else:
        ids = torch.randint(2, 4096, (args.prompts, args.tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    rows, scale_rows = [], []
    fallback = None if args.no_fallback else (args.fallback_prompts or ids.shape[0])
    for family in args.families.split(","):
        model = make_model(family, args.d, args.blocks, args.context).to(args.device).eval()
        states = [("untrained", model)]
        if dm is not None:
            trained = make_model(family, args.d, args.blocks, args.context).to(args.device)
            train_plain(trained, cycle(dm.train_dataloader()), args.train_steps, lr=train_lr(family))
            states.append((f"trained {args.train_steps}", trained))
        for state, m in states:
            for context in ("prompt", "padded"):
                row = {"family": family, "state": state, "context": context,
                       **compare(m, ids, context, args.device, pad, fallback, args.gd_steps)}
                row["exact/gd"] = row["exact"] / row["gd"]
                print(f"{family} {state} {context}: gd {row['gd']:.1f} s, exact {row['exact']:.1f} s", flush=True)
                row["exact self/gd self"] = row["exact self"] / row["gd self"]
                if "fallback self" in row:
                    row["fallback/fast"] = row["fallback self"] / row["fast self (same)"]
                rows.append(row)
            if args.scaling and state == "untrained":  # the pass's cost does not depend on the weights
                scale_rows += [{"family": family, "state": state, **r} for r in scaling(m, ids, args.device, pad)]
    print_table(rows, ["family", "state", "context", "gd", "exact", "exact/gd", "gd self", "exact self",
                       "exact self/gd self", "fallback prompts", "fast self (same)", "fallback self", "fallback/fast",
                       "fast == fallback"],
                f"seconds on {args.device}: {args.prompts} prompts x {args.tokens} tokens, blocks 1..{args.blocks}, "
                f"masks {MASKS}, d {args.d}")
    print_table(rows, ["family", "state", "context", *(f"{g} {k}" for g in ceiling.REGIONS for k in ceiling.CLASSES)],
                "share of positions per class (gd beside exact)")
    if scale_rows:
        print_table(scale_rows, ["family", "state", "axis", "tokens", "vocab", "blocks", "seconds"],
                    "exact self pass (m = 0, prompt context) as it grows")
    payload = {"args": vars(args), "rows": rows, "scaling": scale_rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
