"""From result rows to what people look at: summary table, PNG plots, HTML, W&B.

Everything here reads the tidy rows of `results.jsonl` (one per checkpoint
step x block x mask x prompt x context) and never reruns a probe.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from data.files import write_text_atomic  # noqa: E402
from lmrep import schema  # noqa: E402
from lmrep.metrics import summarize  # noqa: E402
from lmrep.probe.settings import ProbeSettings  # noqa: E402

SUMMARY_KEYS = ("step", "block", "mask", "context")  # one summary cell per value of these
PANELS = (("self_acc", "self (own position)"), ("nonself_acc", "non-self (masked positions)"))


def summary_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (step, block, mask, context) with every summary column of the schema."""
    return summarize(rows, keys=SUMMARY_KEYS)


def summary_fields(*, report_only: bool = False) -> list[str]:
    """The summary's column names: its keys, the prompt count, then the schema's summary columns."""
    names = [c.name for c in schema.summary_columns() if c.report or not report_only]
    return [*SUMMARY_KEYS, "n_prompts", *names]


def write_summary(out_dir: Path, summary: Sequence[dict[str, Any]]) -> None:
    """summary.csv (for people and spreadsheets) and summary.json (for code)."""
    buffer = io.StringIO()
    fields = summary_fields()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in summary:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in fields})
    write_text_atomic(out_dir / "summary.csv", buffer.getvalue())
    write_text_atomic(out_dir / "summary.json", json.dumps(list(summary), indent=1))


def _grid(summary: Sequence[dict[str, Any]], metric: str, mask: int, context: str) -> tuple[list[int], list[int], np.ndarray]:
    """(steps, blocks, values[block, step]) for one mask and context; NaN where missing."""
    cells = [s for s in summary if s["mask"] == mask and s["context"] == context]
    steps = sorted({s["step"] for s in cells})
    blocks = sorted({s["block"] for s in cells})
    values = np.full((len(blocks), len(steps)), np.nan)
    for s in cells:
        if s.get(metric) is not None:
            values[blocks.index(s["block"]), steps.index(s["step"])] = s[metric]
    return steps, blocks, values


def _save(fig: plt.Figure, path: Path) -> Path:
    """Lay out, write and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmaps(summary: Sequence[dict[str, Any]], out_dir: Path, title: str = "") -> list[Path]:
    """Per context: a block x step heatmap of self and non-self recovery for every mask."""
    paths = []
    for context in sorted({s["context"] for s in summary}):
        masks = sorted({s["mask"] for s in summary if s["context"] == context})
        fig, axes = plt.subplots(len(masks), 2, figsize=(10, 2.6 * len(masks) + 0.8), squeeze=False)
        for i, mask in enumerate(masks):
            for j, (metric, label) in enumerate(PANELS):
                ax = axes[i, j]
                steps, blocks, values = _grid(summary, metric, mask, context)
                if metric == "nonself_acc" and mask == 0:
                    ax.axis("off")
                    ax.text(0.5, 0.5, "m = 0: no masked tokens", ha="center", va="center")
                    continue
                image = ax.imshow(values, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
                ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=45, fontsize=7)
                ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
                ax.set_xlabel("training step")
                ax.set_ylabel("block")
                ax.set_title(f"{label}, m = {mask}", fontsize=9)
                fig.colorbar(image, ax=ax, fraction=0.04)
        fig.suptitle(f"{title} top-1 recovery, context = {context}".strip())
        paths.append(_save(fig, out_dir / f"heatmap_{context}.png"))
    return paths


LOG_SPAN = 64  # steps spanning this ratio (largest / smallest non-zero) get a log-like axis


def log_like_steps(steps: Sequence[int]) -> bool:
    """True for checkpoint steps spread over orders of magnitude (0, 1, 2, 4, ..., 1000): plot them on symlog."""
    positive = [s for s in steps if s > 0]
    return len(set(positive)) >= 3 and max(positive) / min(positive) >= LOG_SPAN


def plot_curves(summary: Sequence[dict[str, Any]], out_dir: Path, title: str = "",
                losses: dict[str, Sequence[Sequence[float]]] | None = None) -> list[Path]:
    """Per context: recovery vs training step, one line per block; self and non-self panels per mask.

    With `losses` ({"train": [[step, loss], ...], "val": ...}) a top row shows the
    loss curves on the same step axis, so training and invertibility read together.
    """
    paths = []
    top = 1 if losses and any(losses.values()) else 0
    for context in sorted({s["context"] for s in summary}):
        masks = sorted({s["mask"] for s in summary if s["context"] == context})
        n_rows = len(masks) + top
        fig, axes = plt.subplots(n_rows, 2, figsize=(10, 2.8 * n_rows + 0.8), squeeze=False, sharex=True)
        if losses:
            ax = axes[0, 0]
            for name, points in losses.items():
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if name == "val" else None,
                            ms=3, label=f"{name} loss")
            ax.set_ylabel("cross-entropy")
            ax.set_title("language-model loss", fontsize=9)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            axes[0, 1].axis("off")
        for i, mask in enumerate(masks, start=top):
            for j, (metric, label) in enumerate(PANELS):
                ax = axes[i, j]
                if metric == "nonself_acc" and mask == 0:
                    ax.axis("off")
                    continue
                steps, blocks, values = _grid(summary, metric, mask, context)
                colors = plt.cm.plasma(np.linspace(0, 0.9, max(len(blocks), 1)))
                for b, block in enumerate(blocks):
                    ax.plot(steps, values[b], marker="o", ms=3, color=colors[b], label=f"block {block}")
                ax.set_ylim(-0.03, 1.03)
                ax.set_xlabel("training step")
                ax.set_ylabel("top-1 recovery")
                ax.set_title(f"{label}, m = {mask}", fontsize=9)
                ax.grid(alpha=0.3)
            axes[i, 0].legend(fontsize=7, ncol=2)
        if log_like_steps([s["step"] for s in summary if s["context"] == context]):
            for ax in axes.flat:  # shared x: one call would do, but axes turned off keep their own
                ax.set_xscale("symlog", linthresh=1)
        fig.suptitle(f"{title} invertibility during training, context = {context}".strip())
        paths.append(_save(fig, out_dir / f"curves_{context}.png"))
    return paths


def _token_spans(row: dict[str, Any]) -> str:
    """The reconstruction token by token: green recovered, red not; masked positions underlined."""
    spans = []
    for pos, (got, want) in enumerate(zip(row["recovered_tokens"], row["target_tokens"])):
        cls = "ok" if got == want else "bad"
        if pos < row["mask"]:
            cls += " masked"
        shown = html.escape(got.replace("Ġ", " ").replace("Ċ", "\\n"))
        spans.append(f'<span class="{cls}" title="target: {html.escape(want)}">{shown}</span>')
    return "".join(spans)


def _fmt(value: Any) -> str:
    return "" if value is None else (f"{value:.2f}" if isinstance(value, float) else str(value))


def write_html(rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]], out_dir: Path,
               images: Sequence[Path], title: str, settings: dict[str, Any]) -> Path:
    """report.html: settings, plots, the summary table, and every reconstruction token by token."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>", """<style>
body{font-family:sans-serif;margin:1.5em;max-width:1200px} table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right} .ok{background:#c8f0c8} .bad{background:#f6c6c6}
.masked{text-decoration:underline;font-weight:bold} .rec{font-family:monospace;white-space:pre-wrap}
.rec span{border-right:1px solid #fff} details{margin:0.3em 0}</style>""",
             f"<h1>{html.escape(title)}</h1>",
             "<p>Green: token recovered (top-1); red: not recovered; <u><b>underlined</b></u>: masked position "
             "(m > its index), recoverable only from other positions' outputs. Hover a token for the target.</p>",
             "<h2>Settings</h2><table>" + "".join(
                 f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in settings.items())
             + "</table>", "<h2>Curves</h2>"]
    parts += [f"<p><img src='{p.name}' style='max-width:100%'></p>" for p in images]
    shown = summary_fields(report_only=True)
    parts.append("<h2>Summary</h2><table><tr>" + "".join(f"<th>{c}</th>" for c in shown) + "</tr>")
    for s in summary:
        parts.append("<tr>" + "".join(f"<td>{_fmt(s.get(c))}</td>" for c in shown) + "</tr>")
    parts.append("</table><h2>Reconstructions</h2>")
    for step in sorted({r["step"] for r in rows}):
        parts.append(f"<details {'open' if step == max(r['step'] for r in rows) else ''}><summary><b>step {step}</b>"
                     "</summary>")
        at_step = sorted((r for r in rows if r["step"] == step),
                         key=lambda r: (r["context"], r["mask"], r["block"], r["prompt_index"]))
        for r in at_step:
            parts.append(
                f"<div class='rec'>{r['context']} m={r['mask']} block {r['block']} prompt {r['prompt_index']} "
                f"(self {_fmt(r['self_acc'])}, non-self {_fmt(r['nonself_acc'])}, ratio {_fmt(r['distance_ratio'])}): "
                f"{_token_spans(r)}</div>")
        parts.append("</details>")
    path = out_dir / "report.html"
    write_text_atomic(path, "\n".join(parts))
    return path


def write_report(rows: Sequence[dict[str, Any]], out_dir: str | Path, *, title: str = "lmrep probe",
                 losses: dict[str, Sequence[Sequence[float]]] | None = None) -> dict[str, Path]:
    """Summary, plots and HTML for a set of result rows (and the run's loss curves, if given)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summary_table(rows)
    write_summary(out_dir, summary)
    images = plot_curves(summary, out_dir, title, losses) + plot_heatmaps(summary, out_dir, title)
    names = ["family", *(f.name for f in dataclasses.fields(ProbeSettings) if f.name != "context"), "settings_id"]
    settings = {k: rows[0][k] for k in names if rows and k in rows[0]}
    report = write_html(rows, summary, out_dir, images, title, settings)
    return {"summary": out_dir / "summary.csv", "report": report, **{p.stem: p for p in images}}


# ---------------------------------------------------------------- W&B


def wandb_scalars(summary: Sequence[dict[str, Any]], step: int) -> dict[str, float]:
    """Scalar metrics of one step: probe/<context>/<self|nonself>/m<m>/block_<k>."""
    out = {}
    for s in summary:
        if s["step"] != step:
            continue
        for metric, name in (("self_acc", "self"), ("nonself_acc", "nonself")):
            if s.get(metric) is not None:
                out[f"probe/{s['context']}/{name}/m{s['mask']}/block_{s['block']}"] = s[metric]
    return out


def wandb_charts(summary: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Line charts: recovery vs training step, one line per block; self and non-self panels."""
    import wandb

    charts = {}
    for context in sorted({s["context"] for s in summary}):
        for mask in sorted({s["mask"] for s in summary if s["context"] == context}):
            for metric, name in (("self_acc", "self"), ("nonself_acc", "nonself")):
                if metric == "nonself_acc" and mask == 0:
                    continue
                steps, blocks, values = _grid(summary, metric, mask, context)
                charts[f"probe_curves/{context}/{name}_m{mask}"] = wandb.plot.line_series(
                    xs=steps, ys=[[None if np.isnan(v) else float(v) for v in line] for line in values],
                    keys=[f"block {b}" for b in blocks], title=f"{name} recovery, m={mask}, {context}",
                    xname="training step")
    return charts


def wandb_table(rows: Sequence[dict[str, Any]]) -> Any:
    """A W&B table of every reconstruction."""
    import wandb

    columns = ["context", *(c.name for c in schema.COLUMNS if c.wandb)]
    return wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
