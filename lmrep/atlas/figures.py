"""The atlas's figures, each with the spread over prompts: heatmaps, curves vs step, recovery vs width, losses.

Every recovery value drawn is a pooled top-1 recovery with its 95% bootstrap
interval over prompts (seeds pooled too where a figure averages over them):
bands on curves, error bars on points, the interval's half-width under each
heatmap number.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lmrep.report import log_like_steps  # noqa: E402

# The source author's validation losses (nats; 8 layers, full TinyStories, ~12 h on one RTX 3060).
SOURCE_VAL_LOSS = {("llama", 256): 2.02, ("llama", 512): 1.91, ("flat", 256): 2.15, ("flat", 512): 1.89,
                   ("expanded", 256): 2.20, ("expanded", 512): 2.08}
ANNOTATE_CELLS = 80  # heatmap panels with at most this many cells print their values


def panels_of(cells: Sequence[dict[str, Any]]) -> list[tuple[str, int]]:
    """(metric, mask) panels with data: self at m = 0, non-self at every m > 0."""
    masks = sorted({c["mask"] for c in cells})
    return [("self_acc", 0)] * (0 in masks) + [("nonself_acc", m) for m in masks if m > 0]


def _label(metric: str, mask: int) -> str:
    return f"{'self' if metric == 'self_acc' else 'non-self'}, m = {mask}"


def _save(fig: plt.Figure, path: Path, legend_below: np.ndarray | None = None, ncol: int = 4) -> Path:
    """Save and close `fig`; with `legend_below` (its axes), one legend for every panel goes under the grid
    (many lines would cover a panel's data)."""
    bottom = 0.0
    if legend_below is not None:
        labelled: dict[str, Any] = {}
        for ax in legend_below.flat:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                labelled.setdefault(label, handle)
        rows = -(-len(labelled) // ncol)
        bottom = min(0.25, 0.02 + 0.25 * rows / fig.get_figheight())
        fig.legend(list(labelled.values()), list(labelled.keys()), loc="lower center", ncol=ncol, fontsize=7,
                   frameon=False)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _symlog_steps(axes: Any, steps: Sequence[int]) -> None:
    """Training-step x axes on symlog when the steps span decades: from step 0 (no empty negative decades), with a
    little room past the last step for its markers."""
    if not log_like_steps(steps):
        return
    for ax in np.asarray(axes).flat:
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(-0.5, max(steps) * 1.3)


def _protocol_grid(mine: Sequence[dict[str, Any]], protocols: Sequence[str], top_rows: int = 0,
                   w: float = 3.6, h: float = 2.8) -> tuple[plt.Figure, np.ndarray, list[tuple[Any, str, str, int]]]:
    """One row of panels per protocol present in `mine` (below `top_rows` free rows), one column per panel.

    Returns the figure, its axes and (ax, protocol, metric, mask) for every protocol panel.
    """
    rows = [p for p in protocols if any(c["protocol"] == p for c in mine)]
    panels = panels_of(mine)
    n_rows, n_cols = len(rows) + top_rows, len(panels)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(w * n_cols, h * n_rows + 0.5), squeeze=False)
    cells = [(axes[i, j], protocol, metric, mask) for i, protocol in enumerate(rows, start=top_rows)
             for j, (metric, mask) in enumerate(panels)]
    return fig, axes, cells


def trained_heatmaps(cells: Sequence[dict[str, Any]], protocols: Sequence[str], out_dir: Path) -> list[Path]:
    """Per trained run: block x checkpoint heatmaps, one row of panels per protocol."""
    paths = []
    for run in sorted({c["run"] for c in cells if c["trained"]}):
        mine = [c for c in cells if c["run"] == run and c["trained"]]
        fig, axes, panel_cells = _protocol_grid(mine, protocols)
        for ax, protocol, metric, mask in panel_cells:
            sel = [c for c in mine if c["protocol"] == protocol and c["mask"] == mask]
            steps = sorted({c["step"] for c in sel})
            blocks = sorted({c["block"] for c in sel})
            values = np.full((len(blocks), len(steps)), np.nan)
            half = np.full_like(values, np.nan)
            for c in sel:
                if c.get(metric) is not None:
                    b, t = blocks.index(c["block"]), steps.index(c["step"])
                    values[b, t] = c[metric]
                    half[b, t] = (c[f"{metric}_hi"] - c[f"{metric}_lo"]) / 2
            if not sel or np.isnan(values).all():
                ax.set_axis_off()
                ax.set_title(f"{protocol}: {_label(metric, mask)}: not measured", fontsize=8)
                continue
            ax.imshow(values, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
            if values.size <= ANNOTATE_CELLS:
                for (b, t), v in np.ndenumerate(values):
                    if not np.isnan(v):
                        ax.text(t, b, f"{v:.2f}\n±{half[b, t]:.2f}", ha="center", va="center", fontsize=5,
                                color="white" if v < 0.5 else "black")
            ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=60, fontsize=6)
            ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
            ax.set_xlabel("training step", fontsize=7)
            ax.set_ylabel("block", fontsize=7)
            n = sel[0]["n_prompts"]
            ax.set_title(f"{protocol}: {_label(metric, mask)} (n={n}, ±95%)", fontsize=8)
        fig.suptitle(f"{run}: top-1 recovery by block and checkpoint")
        paths.append(_save(fig, out_dir / f"heatmap_{run}.png"))
    return paths


def _band(ax: plt.Axes, xs: list[float], cells: list[dict[str, Any]], metric: str, **style: Any) -> None:
    """A line with its 95% band."""
    ys = [c[metric] for c in cells]
    lo = [c[f"{metric}_lo"] for c in cells]
    hi = [c[f"{metric}_hi"] for c in cells]
    line = ax.plot(xs, ys, **style)[0]
    ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)


def trained_curves(cells: Sequence[dict[str, Any]], protocols: Sequence[str], losses: dict[str, dict[str, Any]],
                   out_dir: Path) -> list[Path]:
    """Per trained run: the loss curve, then recovery vs step per protocol and panel, one line per block."""
    paths = []
    for run in sorted({c["run"] for c in cells if c["trained"]}):
        mine = [c for c in cells if c["run"] == run and c["trained"]]
        fig, axes, panel_cells = _protocol_grid(mine, protocols, top_rows=1)
        for ax in axes[0, 1:]:
            ax.set_axis_off()
        ax = axes[0, 0]
        for name, points in losses.get(run, {}).items():
            if isinstance(points, list) and points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if name == "val" else None,
                        ms=3, label=f"{name} loss")
        ax.set_title(f"{run}: language-model loss", fontsize=8)
        ax.set_ylabel("nats/token", fontsize=7)
        ax.legend(fontsize=6)
        for ax, protocol, metric, mask in panel_cells:
            sel = [c for c in mine if c["protocol"] == protocol and c["mask"] == mask and c.get(metric) is not None]
            for block in sorted({c["block"] for c in sel}):
                line = sorted((c for c in sel if c["block"] == block), key=lambda c: c["step"])
                _band(ax, [c["step"] for c in line], line, metric, marker="o", ms=3, label=f"block {block}")
            ax.set_ylim(-0.03, 1.03)
            ax.set_title(f"{protocol}: {_label(metric, mask)}" + ("" if sel else ": not measured"), fontsize=8)
            if sel:
                ax.legend(fontsize=6)
        for ax in axes.flat:
            ax.set_xlabel("training step", fontsize=7)
        _symlog_steps(axes, [c["step"] for c in mine])
        fig.suptitle(f"{run}: recovery vs training step (95% band over prompts)")
        paths.append(_save(fig, out_dir / f"curves_{run}.png"))
    return paths


def families_vs_step(cells: Sequence[dict[str, Any]], protocols: Sequence[str], out_dir: Path) -> Path | None:
    """Every trained run on one grid: recovery vs step per protocol and panel, first block solid, last dashed."""
    mine = [c for c in cells if c["trained"]]
    if not mine:
        return None
    runs = sorted({c["run"] for c in mine})
    colors = {run: f"C{i}" for i, run in enumerate(runs)}
    fig, axes, panel_cells = _protocol_grid(mine, protocols)
    for ax, protocol, metric, mask in panel_cells:
        sel = [c for c in mine if c["protocol"] == protocol and c["mask"] == mask and c.get(metric) is not None]
        for run in runs:
            blocks = sorted({c["block"] for c in sel if c["run"] == run})
            for block in blocks:
                line = sorted((c for c in sel if c["run"] == run and c["block"] == block), key=lambda c: c["step"])
                _band(ax, [c["step"] for c in line], line, metric, marker="o", ms=2, color=colors[run],
                      linestyle="-" if block == blocks[0] else "--", label=f"{run} block {block}")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{protocol}: {_label(metric, mask)}" + ("" if sel else ": not measured"), fontsize=8)
        ax.set_xlabel("training step", fontsize=7)
        if not sel:
            ax.set_axis_off()
    _symlog_steps(axes, [c["step"] for c in mine])
    fig.suptitle("trained families: recovery vs training step\n(first block solid, last dashed; 95% band over prompts)",
                 fontsize=10)
    return _save(fig, out_dir / "families_vs_step.png", legend_below=axes)


def model_kind(cell: dict[str, Any]) -> str:
    """What a sweep's line is drawn for: architecture and depth, whatever the sweep is named (d=32-128 and a
    wider d=256-512 sweep of flat mixers are one line)."""
    arch = cell["arch"]
    if arch == "expanded" and cell.get("expansion") is not None:
        arch = f"expanded x{cell['expansion']:g}"
    elif arch == "parallel" and cell.get("n_parallel") is not None:
        arch = f"parallel {cell['n_parallel']}"
    return f"{arch} n={cell['n_blocks']}"


def untrained_vs_width(pooled: Sequence[dict[str, Any]], protocols: Sequence[str], out_dir: Path) -> Path | None:
    """Untrained sweeps: recovery vs d_model per model kind, pooled over seeds and prompts, first block solid, last
    dashed."""
    mine = [c for c in pooled if not c["trained"]]
    if not mine:
        return None
    kinds = sorted({model_kind(c) for c in mine})
    colors = {kind: f"C{i}" for i, kind in enumerate(kinds)}
    fig, axes, panel_cells = _protocol_grid(mine, protocols)
    for ax, protocol, metric, mask in panel_cells:
        sel = [c for c in mine if c["protocol"] == protocol and c["mask"] == mask and c.get(metric) is not None]
        for kind in kinds:
            blocks = sorted({c["block"] for c in sel if model_kind(c) == kind})
            for block in blocks:
                line = sorted((c for c in sel if model_kind(c) == kind and c["block"] == block),
                              key=lambda c: c["d_model"])
                ys = [c[metric] for c in line]
                err = [[y - c[f"{metric}_lo"] for y, c in zip(ys, line)],
                       [c[f"{metric}_hi"] - y for y, c in zip(ys, line)]]
                ax.errorbar([c["d_model"] for c in line], ys, yerr=err, marker="o", ms=3, capsize=2,
                            color=colors[kind], linestyle="-" if block == blocks[0] else "--",
                            label=f"{kind} block {block}")
        ax.set_title(f"{protocol}: {_label(metric, mask)}" + ("" if sel else ": not measured"), fontsize=8)
        if not sel:
            ax.set_axis_off()
            continue
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("d_model", fontsize=7)
    fig.suptitle("untrained models: recovery vs width (seeds and prompts pooled, 95% interval; first block solid, "
                 "last dashed)")
    return _save(fig, out_dir / "untrained_vs_width.png", legend_below=axes)


def validation_losses(val: dict[str, dict[str, Any]], out_dir: Path) -> Path | None:
    """Final validation loss per trained run (95% interval over batches) beside the source author's figures."""
    if not val:
        return None
    runs = sorted(val)
    fig, ax = plt.subplots(figsize=(1.2 * len(runs) + 3, 3.2))
    xs = np.arange(len(runs))
    ours = [val[r]["val_loss"] for r in runs]
    err = [[val[r]["val_loss"] - val[r]["val_loss_lo"] for r in runs],
           [val[r]["val_loss_hi"] - val[r]["val_loss"] for r in runs]]
    ax.bar(xs - 0.2, ours, 0.4, yerr=err, capsize=3, label="lmrep (this budget)")
    theirs = [SOURCE_VAL_LOSS.get((val[r]["arch"], val[r]["d_model"]), np.nan) for r in runs]
    ax.bar(xs + 0.2, theirs, 0.4, hatch="//", color="lightgray", edgecolor="gray",
           label="source author (full TinyStories, ~12 h RTX 3060)")
    ax.set_xticks(xs, runs, fontsize=7)
    ax.set_ylabel("validation loss (nats/token)")
    ax.legend(fontsize=7)
    ax.set_title("validation loss: lmrep vs the source author's much larger budget", fontsize=9)
    return _save(fig, out_dir / "validation_loss.png")


def gd_vs_ceiling(pooled: Sequence[dict[str, Any]], gd: str, ceiling: str, out_dir: Path) -> Path | None:
    """Non-self recovery by gradient descent against the exact ceiling, cell by cell (when both exist)."""
    keys = ("run", "step", "block", "mask", "d_model")
    top = {tuple(c[k] for k in keys): c for c in pooled if c["protocol"] == ceiling and c.get("nonself_acc") is not None}
    pairs = [(c, top[tuple(c[k] for k in keys)]) for c in pooled if c["protocol"] == gd
             and c.get("nonself_acc") is not None and tuple(c[k] for k in keys) in top]
    if not pairs:
        return None
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.errorbar([b["nonself_acc"] for _, b in pairs], [a["nonself_acc"] for a, _ in pairs],
                yerr=[[a["nonself_acc"] - a["nonself_acc_lo"] for a, _ in pairs],
                      [a["nonself_acc_hi"] - a["nonself_acc"] for a, _ in pairs]], fmt="o", ms=3, alpha=0.6)
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":")
    ax.set_xlabel(f"{ceiling} (exact ceiling)")
    ax.set_ylabel(f"{gd} (gradient descent)")
    ax.set_title("non-self recovery: GD vs its exact ceiling", fontsize=9)
    return _save(fig, out_dir / "gd_vs_ceiling.png")
