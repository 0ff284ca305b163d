"""Shared pieces of the benchmarks: data, models, the machine's matmul peak, FLOP counts, output.

Every benchmark compares two things in one process (interleaved where it can),
so that the ratio it reports holds on a noisy, shared 2-core machine even when
the absolute numbers move. Results go to JSON under `runs/benchmarks/` (ignored
by git) and a small table on stdout.

FLOP counts are analytical, per token, forward only, counting the matmuls the
model executes (elementwise work, norms and softmax are left out: they are
memory-bound and a few percent of the total at these sizes):
- masked mixer, per block: token mixing `2 * t * d` per position (the dense
  t x t map as executed, mask included; `parallel` has n of them, `expanded`
  two of size e*t), MLP `2 * 2 * d * (r*d)`;
- llama, per block: q, k, v, o projections `4 * 2 * d^2` (fewer for grouped
  kv heads), scores and weighted values `2 * 2 * t * d` (dense, as the
  attention kernel computes them), SwiGLU `3 * 2 * d * f`;
- LM head `2 * d * V`; the embedding lookup costs no FLOPs.
Training is 3x forward (forward, input gradient, weight gradient). Probing is
2x forward of the probed blocks (the weights are frozen: no weight gradient)
and no LM head.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from data.tinystories import TinyStoriesDataModule

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/<name>.py` from a fresh clone
    sys.path.insert(0, str(REPO))

from data.files import write_text_atomic  # noqa: E402
from lmrep.module import next_token_loss, warmup_cosine, weight_decay_groups  # noqa: E402
from lmrep.configs import read_config  # noqa: E402
from models import build_model  # noqa: E402

RESULTS_DIR = REPO / "runs" / "benchmarks"
DEFAULT_CACHE = REPO / ".cache" / "lmrep"
MATMUL_SIZE = 1024  # square fp32 matmul used to measure the machine's peak
TRAIN_FACTOR = 3  # forward + input gradient + weight gradient
PROBE_FACTOR = 2  # forward + input gradient (frozen weights)
# The training config whose peak lr a benchmark family trains with (read, never copied: see train_lr).
TRAIN_CONFIGS = {"mixer": "mixer_flat.yaml", "llama": "llama.yaml"}


# ---------------------------------------------------------------- output


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` (plus machine info) as JSON, atomically."""
    path = Path(path)
    payload = {"machine": machine_info(), **payload}
    write_text_atomic(path, json.dumps(payload, indent=2, default=float))
    return path


def default_out(name: str) -> str:
    """Default JSON path of benchmark `name`."""
    return str(RESULTS_DIR / f"{name}.json")


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "load_avg_1min": os.getloadavg()[0]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> None:
    """Print rows as a fixed-width table (floats with 4 significant digits)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    table = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))


# ---------------------------------------------------------------- the machine


def matmul_gflops(size: int = MATMUL_SIZE, repeats: int = 5, inner: int = 4, device: str = "cpu") -> float:
    """Measured fp32 matmul GFLOP/s (best of `repeats`), the peak that utilisation is taken against.

    On a GPU the matrices are 8x larger per side (a 1024^3 product is too small to fill one)
    and the timing waits for the device.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        size, inner = size * 8, inner * 4
    a, b = torch.randn(size, size, device=dev), torch.randn(size, size, device=dev)
    out = torch.empty(size, size, device=dev)
    torch.mm(a, b, out=out)  # warm-up
    best = 0.0
    for _ in range(repeats):
        synchronize(dev)
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        synchronize(dev)
        best = max(best, 2 * size**3 * inner / (time.perf_counter() - start) / 1e9)
    return best


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on a CUDA device (a no-op on the CPU), so wall times are honest."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mib_of(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run `argv` in a fresh subprocess; its peak resident set (MiB, from getrusage) and stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # RUSAGE_CHILDREN is the max over waited-for children: a fresh child that is smaller than an
    # earlier one would be hidden, so the child also reports its own figure (RUSAGE_SELF) on stdout.
    own = [line for line in proc.stdout.splitlines() if line.startswith("MAXRSS_KIB ")]
    kib = int(own[-1].split()[1]) if own else max(after, before)
    return kib / 1024, proc.stdout


def own_peak_rss_kib() -> int:
    """This process's peak resident set in KiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ---------------------------------------------------------------- data and models


def data_module(cache_dir: str | Path = DEFAULT_CACHE, context_length: int = 128, batch_size: int = 16,
                max_train_stories: int | None = None) -> TinyStoriesDataModule:
    """The TinyStories data module (local shards), prepared and set up."""
    from data.tinystories import TinyStoriesDataModule  # here: a GPU box measuring untrained models needs no `datasets`

    dm = TinyStoriesDataModule(source="auto", cache_dir=str(cache_dir), context_length=context_length,
                               batch_size=batch_size, packing=True, max_train_stories=max_train_stories,
                               max_val_stories=64 if max_train_stories else None)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def train_lr(family: str) -> float:
    """The peak lr that the family's training config (configs/, over base.yaml) trains with."""
    return float(read_config(REPO / "configs" / TRAIN_CONFIGS[family])["model"]["lr"])


def validation_prompt_ids(dm: TinyStoriesDataModule, n: int, t: int) -> Tensor:
    """The first n validation stories (dm.validation_texts) with at least t tokens, cut to t tokens: (n, t) long."""
    rows: list[list[int]] = []
    want = n
    while len(rows) < n:
        rows = [ids[:t] for ids in (dm.tokenizer.encode(s) for s in dm.validation_texts(want * 2)) if len(ids) >= t]
        if want * 2 > 100_000:
            raise ValueError(f"fewer than {n} validation stories have {t} tokens")
        want *= 2
    return torch.tensor(rows[:n], dtype=torch.long)


def model_config(family: str, d: int, n_blocks: int, context: int) -> tuple[str, dict[str, Any]]:
    """(build_model family, config dict) for the benchmark families 'mixer' (flat) and 'llama'."""
    config: dict[str, Any] = {"d_model": d, "n_blocks": n_blocks, "context_length": context}
    if family == "mixer":
        config["mixing"] = "flat"
    elif family == "llama":
        config["n_heads"] = max(1, d // 64)
    else:
        raise ValueError(f"unknown benchmark family {family!r}: choose mixer or llama")
    return family, config


def make_model(family: str, d: int, n_blocks: int, context: int, seed: int = 0) -> nn.Module:
    """An untrained model, seeded."""
    torch.manual_seed(seed)
    name, config = model_config(family, d, n_blocks, context)
    return build_model(name, config)


def adamw_like_module(model: nn.Module, lr: float, weight_decay: float = 0.1,
                      betas: tuple[float, float] = (0.9, 0.95), fused: bool = True) -> torch.optim.AdamW:
    """AdamW with the LightningModule's parameter groups (no decay on biases, norms, embeddings), fused as there."""
    decay, no_decay = weight_decay_groups(model)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, fused=fused)


def cycle(loader: Any) -> Iterator[dict[str, Tensor]]:
    """Endless iteration over a DataLoader."""
    while True:
        yield from loader


def train_plain(model: nn.Module, batches: Iterator[dict[str, Tensor]], steps: int, *, lr: float = 3e-3,
                warmup: int = 30, clip: float = 1.0, on_step: Callable[[int], None] | None = None) -> nn.Module:
    """The plain PyTorch loop: AdamW, warm-up + cosine, clipping: the same optimisation as the module."""
    model.train()
    opt = adamw_like_module(model, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, steps, 0.1))
    for step in range(steps):
        batch = next(batches)
        loss, _ = next_token_loss(model(batch["input_ids"]), batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step)
    model.eval()
    return model


# ---------------------------------------------------------------- FLOPs


def block_forward_flops_per_token(model: nn.Module, t: int) -> float:
    """Forward FLOPs of one block per position, at sequence length t (see the module docstring)."""
    cfg = model.config
    d = cfg.d_model
    if model.family == "mixer":
        if cfg.mixing == "flat":
            mixing = 2 * t * d
        elif cfg.mixing == "parallel":
            mixing = cfg.n_parallel * 2 * t * d
        else:  # expanded: t -> e*t -> t
            mixing = 2 * 2 * cfg.expansion * t * d
        return mixing + 2 * 2 * d * cfg.mlp_ratio * d
    if model.family == "llama":
        heads = cfg.n_heads
        kv = cfg.n_kv_heads or heads
        head_dim = d // heads
        projections = 2 * d * (2 * d + 2 * kv * head_dim)
        attention = 2 * 2 * t * d
        return projections + attention + 3 * 2 * d * cfg.mlp_width
    raise ValueError(f"no FLOP count for model family {model.family!r}")


def train_flops_per_token(model: nn.Module, t: int) -> float:
    """FLOPs of one training step per token (3x forward of all blocks and the LM head)."""
    cfg = model.config
    head = 2 * cfg.d_model * cfg.vocab_size
    return TRAIN_FACTOR * (model.n_blocks * block_forward_flops_per_token(model, t) + head)


def probe_flops_per_step(model: nn.Module, t: int, blocks: Sequence[int], rows_per_block: int) -> float:
    """FLOPs of one inversion step: rows_per_block rows of t positions for each probed block k (k blocks each)."""
    per_block = block_forward_flops_per_token(model, t)
    return PROBE_FACTOR * per_block * t * rows_per_block * sum(int(k) for k in blocks)
