"""lmrep's probe engine vs the source procedure, on the same models, prompts and steps.

The reference (`source_procedure`) follows the source texts literally: one
prompt at a time, one block and one mask at a time; each prompt right-padded
with the pad token to the model's full context length; the pseudo-inverse of
W_E recomputed for every prompt; plain gradient descent on the summed L1
distance `||hidden(x, k)[:, m:] - Y[:, m:]||_1` with the learning rate decaying
linearly from lr to lr/10 over the steps; decoding `argmax(x @ pinv(W_E))`.
Two choices in the reference's favour: the model's weights are frozen (no
weight gradients), and the start noise is at the embedding's own scale (the
source's N(0, 1) is that scale for mixers and fails llama outright).

The source is strictly sequential, so its cost per prompt is the honest unit:
it is timed on the first `--source-prompts` prompts and extrapolated linearly to
all of them (the output says so). lmrep's engine runs on all prompts at once.
Recovery is compared on the prompts both solved (and lmrep's over all of them
is shown too): self = top-1 over the prompt's positions at m = 0, non-self =
top-1 of the masked position at m = 1, pooled over blocks.

The last row, `free=real`, holds the padding at the pad token's embedding: the
padding is known, so only the prompt is solved for. It is a different (better-posed)
question than the source's and is shown for what knowing the padding buys; it is
not the like-for-like comparison.

    python benchmarks/probe_vs_source.py            # full: 32 prompts, 4 models, ~1 h on 2 cores
    python benchmarks/probe_vs_source.py --quick    # 8 prompts, 1 source prompt, shorter training
    python benchmarks/probe_vs_source.py --device cuda --states untrained \
        --prompts-from runs/benchmarks/probe_vs_source.json   # on a GPU, with an earlier run's prompts
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    DEFAULT_CACHE, cycle, data_module, default_out, make_model, matmul_gflops, print_table,
    probe_flops_per_step, synchronize, train_lr, train_plain, validation_prompt_ids, write_json,
)
from lmrep.checkpoints import load_checkpoint  # noqa: E402
from lmrep.probe import LR_FINAL_FRACTION, ProbeSettings, probe  # noqa: E402


# ---------------------------------------------------------------- the source procedure, literally


def source_procedure(model: nn.Module, prompts: Tensor, blocks: list[int], masks: list[int], *, steps: int,
                     pad_token_id: int, seed: int) -> dict[str, Any]:
    """Invert every (prompt, block, mask) one at a time as the source did; counts and seconds per prompt."""
    w_e = model.embedding_matrix.detach()
    device = w_e.device
    lr = model.probe_lr[("embedding", "gd")]  # calibrated for the summed L1 distance
    init_scale = float(w_e.std())
    length = model.context_length
    t = prompts.shape[1]
    counts = {"self_correct": 0, "n_self": 0, "nonself_correct": 0, "n_nonself": 0}
    per_block: dict[str, list[int]] = {}
    seconds: list[float] = []
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for i, prompt in enumerate(prompts.to(device)):
        synchronize(device)
        start = time.perf_counter()
        pinv = torch.linalg.pinv(w_e)  # recomputed per prompt, as in the source
        ids = torch.full((1, length), pad_token_id, dtype=torch.long, device=device)
        ids[0, :t] = prompt  # right-padded to the model's context length
        for k in blocks:
            for m in masks:
                target = model.hidden(model.embed(ids), k)[:, m:, :]
                generator = torch.Generator().manual_seed(seed * 1000 + i)
                x = (torch.randn(1, length, w_e.shape[1], generator=generator) * init_scale).to(device)
                x.requires_grad_(True)
                for n in range(steps):
                    eta = lr * (1 - (1 - LR_FINAL_FRACTION) * n / max(steps - 1, 1))
                    loss = (model.hidden(x, k)[:, m:, :] - target).abs().sum()
                    (grad,) = torch.autograd.grad(loss, x)
                    with torch.no_grad():
                        x -= eta * grad
                decoded = (x.detach()[0, :t] @ pinv).argmax(-1)  # (t,)
                hit = decoded == prompt
                self_hits, n_self = int(hit[m:].sum()), t - m
                counts["self_correct" if m == 0 else "nonself_correct"] += self_hits if m == 0 else int(hit[:m].sum())
                counts["n_self" if m == 0 else "n_nonself"] += n_self if m == 0 else m
                cell = per_block.setdefault(f"{k}/{m}", [0, 0])
                cell[0] += self_hits if m == 0 else int(hit[:m].sum())
                cell[1] += n_self if m == 0 else m
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return {"counts": counts, "per_block": per_block, "seconds_per_prompt": seconds}


# ---------------------------------------------------------------- lmrep


def lmrep_counts(result: Any, prompt_subset: int | None = None) -> dict[str, int]:
    """Self (m = 0 rows) and non-self (m >= 1 rows) counts of a ProbeResult, optionally on the first prompts."""
    keep = torch.ones_like(result.mask, dtype=torch.bool)
    if prompt_subset is not None:
        keep = result.prompt_index < prompt_subset
    self_rows = keep & (result.mask == 0)
    other_rows = keep & (result.mask > 0)
    c = result.values
    return {"self_correct": int(c["self_correct"][self_rows].sum()), "n_self": int(c["n_self"][self_rows].sum()),
            "nonself_correct": int(c["nonself_correct"][other_rows].sum()),
            "n_nonself": int(c["n_nonself"][other_rows].sum())}


def lmrep_per_block(result: Any) -> dict[str, list[int]]:
    """{'block/mask': [correct, total]} over all prompts (self for m = 0, non-self otherwise)."""
    out: dict[str, list[int]] = {}
    c = result.values
    for r in range(result.block.shape[0]):
        m = int(result.mask[r])
        key = f"{int(result.block[r])}/{m}"
        cell = out.setdefault(key, [0, 0])
        cell[0] += int(c["self_correct"][r] if m == 0 else c["nonself_correct"][r])
        cell[1] += int(c["n_self"][r] if m == 0 else c["n_nonself"][r])
    return out


def fraction(correct: int, total: int) -> float | None:
    """correct / total, None when there is nothing to count."""
    return correct / total if total else None


# ---------------------------------------------------------------- the benchmark


def get_model(family: str, state: str, args: argparse.Namespace, dm: Any) -> nn.Module:
    """An untrained model, a briefly trained one (plain loop, on the CPU), or one loaded from a checkpoint."""
    checkpoint = getattr(args, f"checkpoint_{family}")
    if state == "trained" and checkpoint:
        return load_checkpoint(checkpoint).model.eval().to(args.device)
    model = make_model(family, args.d, args.blocks, args.context, seed=args.seed)
    if state == "trained":
        torch.manual_seed(args.seed)
        train_plain(model, cycle(dm.train_dataloader()), args.train_steps, lr=train_lr(family),
                    warmup=max(1, args.train_steps // 10))
    return model.eval().to(args.device)


def warm_up(model: nn.Module, prompts: Tensor, pad: int) -> None:
    """A few untimed steps of both runners, so one-off costs (CUDA context, kernel choice) are in neither."""
    source_procedure(model, prompts[:1], [1], [0], steps=2, pad_token_id=pad, seed=0)
    for context in ("padded", "prompt"):
        probe(model, prompts[:2], blocks=[1, 2], masks=[0, 1], pad_token_id=pad,
              settings=ProbeSettings(context=context, steps=2))


def run_case(family: str, state: str, args: argparse.Namespace, dm: Any, prompts: Tensor,
             pad: int) -> list[dict[str, Any]]:
    """Source vs lmrep (padded, prompt; defaults and early stopping) for one model."""
    model = get_model(family, state, args, dm)
    if torch.device(args.device).type == "cuda":
        warm_up(model, prompts, pad)
    blocks = list(range(1, model.n_blocks + 1))
    masks = list(args.masks)
    n_prompts, n_source = prompts.shape[0], min(args.source_prompts, prompts.shape[0])
    rows: list[dict[str, Any]] = []

    src = source_procedure(model, prompts[:n_source], blocks, masks, steps=args.steps, pad_token_id=pad,
                           seed=args.seed)
    per_prompt = sum(src["seconds_per_prompt"]) / n_source
    source_seconds = per_prompt * n_prompts  # strictly one prompt at a time: linear in prompts
    c = src["counts"]
    rows.append({"family": family, "state": state, "runner": "source", "context": "padded",
                 "prompts_timed": n_source, "seconds": source_seconds, "extrapolated": n_source < n_prompts,
                 "speedup": 1.0, "self": fraction(c["self_correct"], c["n_self"]),
                 "nonself": fraction(c["nonself_correct"], c["n_nonself"]),
                 "self_subset": fraction(c["self_correct"], c["n_self"]),
                 "nonself_subset": fraction(c["nonself_correct"], c["n_nonself"]),
                 "steps_run": float(args.steps), "per_block": src["per_block"]})

    # (context, patience, prompts solved, free), lmrep's defaults otherwise (on a CPU the engine
    # solves ~2048 positions at a time, on a GPU all rows at once). The last row holds the padding,
    # a different (easier) problem than the source's, shown for what knowing the padding buys.
    # Without early stopping lmrep padded costs ~half the source per prompt on a CPU, so there it is
    # run on the source's prompts only and extrapolated; on a GPU it is cheap: all prompts, batched.
    on_cpu = torch.device(args.device).type == "cpu"
    variants = [("padded", None, n_source if on_cpu else None, "all")]
    variants += [("padded", patience, None, "all") for patience in args.patience]
    variants += [("prompt", None, None, "all")]
    variants += [("prompt", patience, None, "all") for patience in args.patience]
    variants += [("padded", args.patience[-1], None, "real")]
    for context, patience, subset, free in variants:
        settings = ProbeSettings(context=context, steps=args.steps, patience=patience, seed=args.seed, free=free)
        solved = prompts[:subset] if subset else prompts
        start = time.perf_counter()
        result = probe(model, solved, blocks=blocks, masks=masks, settings=settings, pad_token_id=pad)
        seconds = (time.perf_counter() - start) * (n_prompts / solved.shape[0])
        all_counts = lmrep_counts(result)
        sub = lmrep_counts(result, n_source)
        t_ctx = model.context_length if context == "padded" else prompts.shape[1]
        steps_run = float(result.steps_run.float().mean())
        flops = probe_flops_per_step(model, t_ctx, blocks, len(masks) * n_prompts) * steps_run
        rows.append({"family": family, "state": state,
                     "runner": "lmrep" + (f" patience={patience}" if patience else " defaults")
                               + (f" free={free}" if free != "all" else ""),
                     "context": context, "prompts_timed": solved.shape[0], "seconds": seconds,
                     "extrapolated": solved.shape[0] < n_prompts, "speedup": source_seconds / seconds,
                     "self": fraction(all_counts["self_correct"], all_counts["n_self"]),
                     "nonself": fraction(all_counts["nonself_correct"], all_counts["n_nonself"]),
                     "self_subset": fraction(sub["self_correct"], sub["n_self"]),
                     "nonself_subset": fraction(sub["nonself_correct"], sub["n_nonself"]),
                     "steps_run": steps_run, "gflops_per_s": flops / seconds / 1e9,
                     "settings": dataclasses.asdict(result.settings), "per_block": lmrep_per_block(result)})
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["mixer", "llama"], choices=["mixer", "llama"])
    p.add_argument("--states", nargs="+", default=["untrained", "trained"], choices=["untrained", "trained"])
    p.add_argument("--d", type=int, default=256, help="model width")
    p.add_argument("--blocks", type=int, default=8, help="number of blocks (all are probed)")
    p.add_argument("--context", type=int, default=128, help="model context length L")
    p.add_argument("--prompts", type=int, default=32, help="validation prompts")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    p.add_argument("--steps", type=int, default=500, help="inversion steps")
    p.add_argument("--masks", type=int, nargs="+", default=[0, 1])
    p.add_argument("--source-prompts", type=int, default=4, help="prompts the source procedure is timed on")
    p.add_argument("--patience", type=int, nargs="+", default=[50, 100],
                   help="lmrep early stopping (steps with unchanged decodes); one set of rows per value")
    p.add_argument("--train-steps", type=int, default=200, help="plain-loop steps for the 'trained' models")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--checkpoint-mixer", default=None, help="use this checkpoint as the trained mixer")
    p.add_argument("--checkpoint-llama", default=None, help="use this checkpoint as the trained llama")
    p.add_argument("--max-train-stories", type=int, default=None, help="limit the tokenized training set")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="8 prompts, 1 source prompt, 60 training steps")
    p.add_argument("--device", default="cpu", help="run both runners here, e.g. cuda (the source stays sequential)")
    p.add_argument("--prompts-from", default=None,
                   help="reuse the prompts (token ids) of an earlier run's JSON: no TinyStories data needed "
                        "for untrained models, e.g. on a GPU machine")
    p.add_argument("--out", default=default_out("probe_vs_source"))
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.source_prompts, args.train_steps = 8, 1, 60
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison, print the table, write the JSON; returns the payload."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    needs_training = "trained" in args.states and not (args.checkpoint_mixer and args.checkpoint_llama)
    dm = None
    if needs_training or not args.prompts_from:
        dm = data_module(args.cache_dir, args.context, args.train_batch, args.max_train_stories)
    if args.prompts_from:
        earlier = json.loads(Path(args.prompts_from).read_text())
        prompts = torch.tensor(earlier["prompts"], dtype=torch.long)[: args.prompts, : args.prompt_len]
        pad = int(earlier["pad_token_id"])
        if prompts.shape != (args.prompts, args.prompt_len):
            raise SystemExit(f"{args.prompts_from} holds prompts of shape {tuple(prompts.shape)}, "
                             f"fewer than {args.prompts} x {args.prompt_len}")
    else:
        assert dm is not None
        prompts, pad = validation_prompt_ids(dm, args.prompts, args.prompt_len), dm.pad_token_id
    peak = matmul_gflops(device=args.device)
    rows = []
    for family in args.families:
        for state in args.states:
            rows.extend(run_case(family, state, args, dm, prompts, pad))
    for row in rows:
        row["utilisation"] = row["gflops_per_s"] / peak if row.get("gflops_per_s") else None
    print_table(rows, ["family", "state", "runner", "context", "prompts_timed", "seconds", "speedup", "self",
                       "nonself", "self_subset", "nonself_subset", "steps_run", "utilisation"],
                title=f"probe vs source procedure ({args.prompts} prompts x {args.prompt_len} tokens, "
                      f"{args.blocks} blocks, masks {args.masks}, {args.steps} steps; source timed on "
                      f"{min(args.source_prompts, args.prompts)} prompt(s), extrapolated per prompt; "
                      f"*_subset = recovery on those prompts; matmul peak {peak:.0f} GFLOP/s)")
    payload = {"benchmark": "probe_vs_source", "args": vars(args), "matmul_gflops": peak, "rows": rows,
               "prompts": prompts.tolist(), "pad_token_id": pad}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
