"""From result rows to what people look at: summary table, PNG plots, HTML, W&B.

Everything here reads the tidy rows of `results.jsonl` (one per checkpoint
step x block x mask x prompt x context x method) and never reruns a probe.
Where exact rows (method=exact) are present, the recovery curves and heatmaps
show exact identifiability beside the gradient method's recovery (dashed lines,
extra heatmap panels), and the reconstructions colour every token by its class
(`lmrep.ceiling`: recovered / identifiable but missed / not identifiable / tie).
"""

from __future__ import annotations

import base64
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
from lmrep import ceiling, schema  # noqa: E402
from lmrep.metrics import summarize  # noqa: E402
from lmrep.probe.settings import ProbeSettings  # noqa: E402

SUMMARY_KEYS = ("step", "block", "mask", "context", "method")
RESULTS_NAME = "results.jsonl"  # one summary cell per value of these
PANELS = (("self_acc", "self (own position)"), ("nonself_acc", "non-self (masked positions)"))
CEILING = {"self_acc": "self_identifiable", "nonself_acc": "nonself_identifiable"}  # exact's column per panel
PANEL_COLUMNS = 3  # panels per figure row
ANNOTATE_CELLS = 120  # heatmaps with at most this many cells print their values
# (line style, marker) per block, cycled: coinciding curves stay distinguishable.
LINE_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1)), "v"), ((0, (1, 1)), "P"))


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


def split_methods(summary: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(recovery cells, exact cells): the recovery curves are one gradient method's (the first in the cells),
    or exact's own top-1 when no gradient rows are present; the exact cells give the ceiling."""
    exact = [s for s in summary if s.get("method") == ceiling.EXACT]
    others = sorted({str(s.get("method")) for s in summary} - {ceiling.EXACT})
    recovery = [s for s in summary if str(s.get("method")) == others[0]] if others else exact
    return recovery, exact


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


def _panels(summary: Sequence[dict[str, Any]], context: str) -> list[tuple[str, str, int]]:
    """The (metric, label, mask) panels that have data: self for every mask, non-self for masks > 0."""
    masks = sorted({s["mask"] for s in summary if s["context"] == context})
    return [(metric, label, m) for metric, label in PANELS for m in masks if metric == "self_acc" or m > 0]


def grid_shape(n_panels: int) -> tuple[int, int]:
    """(rows, columns) for n panels: the fewest rows of at most PANEL_COLUMNS, then the fewest columns that
    hold them (4 panels are 2 x 2, not a row of 3 over a lone panel)."""
    rows = -(-n_panels // PANEL_COLUMNS)
    return rows, -(-n_panels // rows)


def _figure(n_panels: int, width: float = 4.2, height: float = 3.0) -> tuple[plt.Figure, list[plt.Axes]]:
    """A grid of panels (`grid_shape`), with no empty panels left on screen."""
    rows, cols = grid_shape(n_panels)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.6), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n_panels:]:
        ax.remove()
    return fig, flat[:n_panels]


def _n_label(summary: Sequence[dict[str, Any]], context: str, mask: int) -> str:
    """'n = 8 prompts' (or a range) for the cells of one context and mask."""
    counts = sorted({s["n_prompts"] for s in summary if s["context"] == context and s["mask"] == mask})
    return f"n = {counts[0]} prompts" if len(counts) == 1 else f"n = {counts[0]}-{counts[-1]} prompts"


def plot_heatmaps(summary: Sequence[dict[str, Any]], out_dir: Path, title: str = "") -> list[Path]:
    """Per context: a block x step heatmap of self recovery per mask, and of non-self per mask > 0."""
    paths = []
    recovery, exact = split_methods(summary)
    for context in sorted({s["context"] for s in summary}):
        panels = [(recovery, metric, f"{label} top-1 recovery", mask) for metric, label, mask in _panels(recovery, context)]
        if exact:  # the ceiling beside it
            panels += [(exact, CEILING[metric], f"{label} identifiable (exact)", mask)
                       for metric, label, mask in _panels(exact, context)]
        fig, axes = _figure(len(panels))
        for ax, (cells, metric, label, mask) in zip(axes, panels):
            steps, blocks, values = _grid(cells, metric, mask, context)
            image = ax.imshow(values, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
            if len(steps) * len(blocks) <= ANNOTATE_CELLS:
                for (b, t), v in np.ndenumerate(values):
                    if not np.isnan(v):
                        ax.text(t, b, f"{v:.2f}", ha="center", va="center", fontsize=6,
                                color="white" if v < 0.5 else "black")
            ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=45, fontsize=7)
            ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
            ax.set_xlabel("training step")
            ax.set_ylabel("block")
            ax.set_title(f"{label}, m = {mask}\n({_n_label(summary, context, mask)})", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.04)
        fig.suptitle(f"{title} context = {context}".strip())
        paths.append(_save(fig, out_dir / f"heatmap_{context}.png"))
    return paths


LOG_SPAN = 64  # steps spanning this ratio (largest / smallest non-zero) get a log-like axis


def log_like_steps(steps: Sequence[int]) -> bool:
    """True for checkpoint steps spread over orders of magnitude (0, 1, 2, 4, ..., 1000): plot them on symlog."""
    positive = [s for s in steps if s > 0]
    return len(set(positive)) >= 3 and max(positive) / min(positive) >= LOG_SPAN


def plot_curves(summary: Sequence[dict[str, Any]], out_dir: Path, title: str = "",
                losses: dict[str, Sequence[Sequence[float]]] | None = None) -> list[Path]:
    """Per context: recovery vs training step, one line per block with its 95% band over prompts.

    Panels: self for every mask, non-self for every mask > 0, and with `losses`
    ({"train": [[step, loss], ...], "val": ...}) the loss curves first, so training
    and invertibility read together. Blocks differ in colour, line style and marker,
    so coinciding curves stay visible; steps spread over orders of magnitude get a
    symlog axis.
    """
    paths = []
    has_loss = bool(losses and any(losses.values()))
    recovery, exact = split_methods(summary)
    summary = recovery
    for context in sorted({s["context"] for s in summary}):
        panels = _panels(summary, context)
        fig, axes = _figure(len(panels) + has_loss)
        log_x = log_like_steps([s["step"] for s in summary if s["context"] == context])
        if has_loss:
            ax = axes[0]
            for name, points in losses.items():  # type: ignore[union-attr]
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if name == "val" else None,
                            ms=3, label=f"{name} loss")
            ax.set_ylabel("cross-entropy (nats)")
            ax.set_xlabel("training step")
            ax.set_title("language-model loss", fontsize=9)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        for ax, (metric, label, mask) in zip(axes[has_loss:], panels):
            steps, blocks, values = _grid(summary, metric, mask, context)
            _, _, low = _grid(summary, f"{metric}_lo", mask, context)
            _, _, high = _grid(summary, f"{metric}_hi", mask, context)
            colors = plt.cm.plasma(np.linspace(0, 0.85, max(len(blocks), 1)))
            for b, block in enumerate(blocks):
                style = LINE_STYLES[b % len(LINE_STYLES)]
                ax.fill_between(steps, low[b], high[b], color=colors[b], alpha=0.12, linewidth=0)
                ax.plot(steps, values[b], color=colors[b], linestyle=style[0], marker=style[1],
                        ms=6 - 3 * b / max(len(blocks), 1), mfc="none", label=f"block {block}")
            if exact:  # the ceiling: exact identifiability, same colour, thin dashed
                e_steps, e_blocks, e_values = _grid(exact, CEILING[metric], mask, context)
                for b, block in enumerate(e_blocks):
                    color = colors[blocks.index(block)] if block in blocks else "grey"
                    ax.plot(e_steps, e_values[b], color=color, linestyle="--", linewidth=0.9, marker="x", ms=4,
                            label=f"block {block} identifiable")
            ax.set_ylim(-0.03, 1.03)
            ax.set_xlabel("training step")
            ax.set_ylabel("top-1 recovery" + (" / identifiable (x, dashed)" if exact else ""))
            ax.set_title(f"{label}, m = {mask}\n({_n_label(summary, context, mask)}; 95% band)", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
        if log_x:
            last = max(s["step"] for s in summary if s["context"] == context)
            for ax in axes:
                ax.set_xscale("symlog", linthresh=1)
                # Steps are >= 0: no empty negative decades; a little room past the last step for its markers.
                ax.set_xlim(-0.5, last * 1.3)
        fig.suptitle(f"{title} invertibility during training, context = {context}".strip())
        paths.append(_save(fig, out_dir / f"curves_{context}.png"))
    return paths


CLASS_STYLE = {"recovered": "ok", "missed": "missed", "lost": "lost", "tie": "tie"}  # ceiling class -> CSS class


def _token_spans(row: dict[str, Any], classes: Sequence[str | None] | None = None) -> str:
    """The reconstruction token by token: green recovered, red not (or by ceiling class); masked underlined."""
    spans = []
    for pos, (got, want) in enumerate(zip(row["recovered_tokens"], row["target_tokens"])):
        cls = "ok" if got == want else "bad"
        if classes is not None and classes[pos] is not None:
            cls = CLASS_STYLE[classes[pos]]
        if pos < row["mask"]:
            cls += " masked"
        shown = html.escape(got.replace("Ġ", " ").replace("Ċ", "\\n"))
        spans.append(f'<span class="{cls}" title="target: {html.escape(want)}">{shown}</span>')
    return "".join(spans)


def _fmt(value: Any, digits: int = 2) -> str:
    """A cell value: floats rounded, None empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.2g}"
    return str(value)


def _image_tag(path: Path) -> str:
    """An <img> with the PNG embedded, so report.html is one self-contained file."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<p><img alt='{html.escape(path.stem)}' src='data:image/png;base64,{data}' style='max-width:100%'></p>"


def _pivot(summary: Sequence[dict[str, Any]], metric: str, context: str, mask: int) -> str:  # cells of one method
    """A block x step table of one metric, each cell with its interval and n on hover."""
    steps, blocks, values = _grid(summary, metric, mask, context)
    cells = {(s["block"], s["step"]): s for s in summary if s["context"] == context and s["mask"] == mask}
    head = "<tr><th>block \\ step</th>" + "".join(f"<th>{t}</th>" for t in steps) + "</tr>"
    body = []
    for b, block in enumerate(blocks):
        tds = []
        for t, step in enumerate(steps):
            cell = cells.get((block, step), {})
            lo, hi = cell.get(f"{metric}_lo"), cell.get(f"{metric}_hi")
            hover = f"n = {cell.get('n_prompts')} prompts" + (f", 95% [{lo:.2f}, {hi:.2f}]" if lo is not None else "")
            value = None if np.isnan(values[b, t]) else float(values[b, t])
            tds.append(f"<td title='{hover}'>{_fmt(value)}</td>")
        body.append(f"<tr><th>{block}</th>{''.join(tds)}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _run_facts(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What was probed, read off the rows: prompts, tokens, blocks, masks, contexts, steps."""
    lengths = [len(r["target_ids"]) for r in rows]
    return {
        "prompts": len({r["prompt_index"] for r in rows}),
        "tokens per prompt": f"{min(lengths)}-{max(lengths)}" if min(lengths) != max(lengths) else str(max(lengths)),
        "blocks": ",".join(map(str, sorted({r["block"] for r in rows}))),
        "masks": ",".join(map(str, sorted({r["mask"] for r in rows}))),
        "contexts": ",".join(sorted({r["context"] for r in rows})),
        "checkpoint steps": ",".join(map(str, sorted({r["step"] for r in rows}))),
        "methods": ",".join(sorted({str(r.get("method")) for r in rows})),
    }


def write_html(rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]], out_dir: Path,
               images: Sequence[Path], title: str, settings: dict[str, Any]) -> Path:
    """report.html, one self-contained file: settings, plots, block x step tables, every reconstruction."""
    facts = {**_run_facts(rows), **settings} if rows else settings
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>", """<style>
body{font-family:sans-serif;margin:1.5em;max-width:1200px} table{border-collapse:collapse;font-size:12px;margin:0.3em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right} .ok{background:#c8f0c8} .bad{background:#f6c6c6}
.masked{text-decoration:underline;font-weight:bold} .rec{font-family:monospace;white-space:pre-wrap}
.rec span{border-right:1px solid #fff} details{margin:0.3em 0} .missed{background:#ffd27f}
.lost{background:#c9c9c9;color:#555} .tie{background:#c8f0c8;outline:2px dashed #a00}</style>""",
             f"<h1>{html.escape(title)}</h1>",
             "<p>Each block's output is inverted by gradient descent from noise; a token counts as recovered when "
             "the decoded input gives it back (top-1). <b>Self</b>: positions whose own output is in the loss; "
             "<b>non-self</b>: the first m positions, masked out of the loss, recoverable only through the other "
             "positions' outputs. The <b>distance ratio</b> is the inverted input's output distance to the target "
             "over that of the true input shifted by a little noise: below 1, the inversion is as close as a "
             "slightly shifted true input (the source's success criterion). This file is self-contained (plots "
             f"embedded); the full numbers are in summary.csv and {RESULTS_NAME} beside it.</p>",
             "<h2>Settings</h2><table>" + "".join(
                 f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v, 4))}</td></tr>" for k, v in facts.items())
             + "</table>", "<h2>Curves</h2>"]
    parts += [_image_tag(p) for p in images]
    parts.append("<h2>Summary: top-1 recovery by block and training step</h2>"
                 "<p>Hover a cell for its number of prompts and 95% interval (bootstrap over prompts).</p>")
    recovery, exact = split_methods(summary)
    for context in sorted({s["context"] for s in summary}):
        for metric, label, mask in _panels(recovery, context):
            parts.append(f"<h3>{html.escape(label)}, m = {mask}, {context} context</h3>"
                         + _pivot(recovery, metric, context, mask))
            if exact and mask in {s["mask"] for s in exact if s["context"] == context}:
                parts.append(f"<h3>{html.escape(label)} identifiable (exact), m = {mask}, {context} context</h3>"
                             + _pivot(exact, CEILING[metric], context, mask))
        shown = [c for c in summary_fields(report_only=True) if c not in SUMMARY_KEYS]
        for mask in sorted({s["mask"] for s in recovery if s["context"] == context}):
            parts.append(f"<h3>mean distance ratio, m = {mask}, {context} context</h3>"
                         + _pivot(recovery, "distance_ratio", context, mask))
        for mask in sorted({s["mask"] for s in summary if s["context"] == context}):
            cells = sorted((s for s in summary if s["context"] == context and s["mask"] == mask),
                           key=lambda s: (s["block"], s["step"], str(s.get("method"))))
            parts.append(f"<details><summary>every summary column, m = {mask}, {context} context</summary><table>"
                         "<tr><th>block</th><th>step</th><th>method</th>" + "".join(f"<th>{c}</th>" for c in shown)
                         + "</tr>" + "".join(f"<tr><td>{c['block']}</td><td>{c['step']}</td><td>{c.get('method')}</td>"
                                             + "".join(f"<td>{_fmt(c.get(n))}</td>" for n in shown) + "</tr>"
                                             for c in cells) + "</table></details>")
    classified = ceiling.classified_rows(rows)
    if classified:
        parts.append(_class_table(ceiling.class_counts(rows)))
    classes_of = {id(r): c for r, c in classified}
    shown_rows = [r for r in rows if not ceiling.is_exact(r) or id(r) in classes_of]
    parts.append("<h2>Reconstructions</h2><p>Green: token recovered (top-1); red: not recovered; "
                 "<u><b>underlined</b></u>: masked position (index < m). Hover a token for the target."
                 + (" Where exact rows exist: green recovered and identifiable; <span class='missed'>orange"
                    "</span>: identifiable but missed by gradient descent; <span class='lost'>grey</span>: not "
                    "identifiable (the representation lost it); <span class='tie'>dashed</span>: recovered "
                    "though not identifiable (a tie). An exact row alone: green identifiable, grey not."
                    if classified else "") + "</p>")
    for step in sorted({r["step"] for r in shown_rows}):
        parts.append(f"<details {'open' if step == max(r['step'] for r in rows) else ''}><summary><b>step {step}</b>"
                     "</summary>")
        at_step = sorted((r for r in shown_rows if r["step"] == step),
                         key=lambda r: (r["context"], r["mask"], r["block"], r["prompt_index"]))
        for r in at_step:
            scores = [f"self {_fmt(r['self_acc'])}" if r.get("self_acc") is not None else "self not measured"]
            if r["mask"] > 0:
                scores.append(f"non-self {_fmt(r.get('nonself_acc'))}")
            scores.append(f"ratio {_fmt(r.get('distance_ratio'))}")
            parts.append(f"<div class='rec'>{r.get('method')} {r['context']} m={r['mask']} block {r['block']} prompt "
                         f"{r['prompt_index']} ({', '.join(scores)}): {_token_spans(r, classes_of.get(id(r)))}</div>")
        parts.append("</details>")
    path = out_dir / "report.html"
    write_text_atomic(path, "\n".join(parts))
    return path


def _class_table(counts: Sequence[dict[str, Any]]) -> str:
    """The summary's count of positions per ceiling class (`lmrep.ceiling`), per cell."""
    names = [f"{g}_{c}" for g in ceiling.REGIONS for c in ceiling.CLASSES]
    head = "".join(f"<th>{k}</th>" for k in (*ceiling.CLASS_KEYS, "compared", *names))
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c[k])}</td>" for k in (*ceiling.CLASS_KEYS, "compared", *names))
                   + "</tr>" for c in counts)
    return ("<h2>Gradient descent beside its ceiling: positions per class</h2><p>recovered: recovered and "
            "identifiable; missed: identifiable, not recovered (the optimiser failed); lost: not identifiable, not "
            "recovered (the representation lost it); tie: recovered though not identifiable. compared = False: "
            f"exact rows alone (recovered = identifiable).</p><table><tr>{head}</tr>{body}</table>")


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
    files = {"summary": out_dir / "summary.csv", "report": report, **{p.stem: p for p in images}}
    counts = ceiling.class_counts(rows)
    if counts:  # the positions per class, for code and spreadsheets
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(counts[0]))
        writer.writeheader()
        writer.writerows(counts)
        write_text_atomic(out_dir / "classes.csv", buffer.getvalue())
        files["classes"] = out_dir / "classes.csv"
    return files


# ---------------------------------------------------------------- W&B


def wandb_scalars(summary: Sequence[dict[str, Any]], step: int) -> dict[str, float]:
    """Scalar metrics of one step: probe/<context>/<self|nonself>/m<m>/block_<k> (recovery), and with exact
    rows probe/<context>/<self|nonself>_identifiable/m<m>/block_<k> (the ceiling)."""
    out = {}
    recovery, exact = split_methods(summary)
    for cells, pairs in ((recovery, (("self_acc", "self"), ("nonself_acc", "nonself"))),
                         (exact, tuple((c, c) for c in CEILING.values()))):
        for s in cells:
            if s["step"] != step:
                continue
            for metric, name in pairs:
                if s.get(metric) is not None:
                    out[f"probe/{s['context']}/{name}/m{s['mask']}/block_{s['block']}"] = s[metric]
    return out


def wandb_charts(summary: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Line charts: recovery vs training step, one line per block; self and non-self panels."""
    import wandb

    charts = {}
    recovery, exact = split_methods(summary)
    series = [(recovery, metric, name) for metric, name in (("self_acc", "self"), ("nonself_acc", "nonself"))]
    if exact:
        series += [(exact, CEILING[metric], CEILING[metric]) for metric, _ in PANELS]
    for context in sorted({s["context"] for s in summary}):
        for mask in sorted({s["mask"] for s in summary if s["context"] == context}):
            for cells, metric, name in series:
                if metric.startswith("nonself") and mask == 0:
                    continue
                steps, blocks, values = _grid(cells, metric, mask, context)
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
