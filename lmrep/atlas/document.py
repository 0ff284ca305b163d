"""From the stages' results to the atlas's outputs: atlas.csv, claims.json, the figures, report.md and report.html.

Reads only what the stages wrote (results.jsonl, losses, validation losses), so
re-running the report never probes or trains.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data.files import write_text_atomic
from lmrep.atlas import figures
from lmrep.atlas.claims import explain, judge_claims
from lmrep.atlas.preset import AtlasPreset
from lmrep.atlas.report import Part, heading, image, para, pre, table, write_reports
from lmrep.atlas.stages import StageLog, losses_of
from lmrep.atlas.table import cell_table, collect_rows, pooled_cells, write_atlas_csv
from lmrep.atlas.training import VAL_LOSS_FILE, read_json
from lmrep.prompts import PromptSet

POOLED_KEYS = ["stage", "protocol", "run", "arch", "expansion", "n_parallel", "d_model", "n_blocks", "trained", "step",
               "block", "mask"]


def write_atlas(preset: AtlasPreset, out: Path, prompts: PromptSet, log: StageLog, times: dict[str, float],
                device: str, wall: float) -> dict[str, Path]:
    """Every output of the atlas into `out`; returns the main files by name."""
    rows = collect_rows(log.dirs)
    cells = cell_table(rows)
    for cell in cells:
        cell["trained"] = bool(cell["trained"])
    csv_path = write_atlas_csv(cells, out / "atlas.csv")
    pooled = pooled_cells(rows, POOLED_KEYS)
    names = [p.name for p in preset.protocols]
    verdicts = judge_claims(preset.claims, cells, names)
    write_text_atomic(out / "claims.json", json.dumps([
        {"id": v.claim_id, "claim": v.text, "verdict": v.verdict, "explanation": explain(v, preset.protocols),
         "by_protocol": {p: {"result": j.result, "cells": j.evidence} for p, j in v.by_protocol.items()}}
        for v in verdicts], indent=1))
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    losses = {name: losses_of(run_dir) for name, run_dir in log.trained_runs.items()}
    val = {}
    for name, run_dir in log.trained_runs.items():
        record = read_json(run_dir / VAL_LOSS_FILE)
        facts = next((c for c in cells if c["run"] == name), None)
        if record and facts:
            val[name] = {**record, "arch": facts["arch"], "d_model": facts["d_model"],
                         "batches_per_epoch": losses[name].get("batches_per_epoch")}
    parts: list[Part] = [heading(f"lmrep atlas: the {preset.name} preset", 1), para(preset.description)]
    parts += run_facts(preset, prompts, log, times, device, wall, val)
    parts.append(heading("Claims"))
    parts.append(para("Each verdict is computed from atlas.csv by the rule written next to the claim in the preset "
                      "(`configs/atlas/" + preset.name + ".yaml`), under every protocol separately: **holds** / "
                      "**fails** when every protocol with the cells agrees, **depends on protocol** when they differ, "
                      "**not tested at this scale** when no cell of the preset answers it."))
    parts.append(table(["#", "claim", "verdict", "by protocol", "where lmrep and the source differ"],
                       [[v.claim_id, v.text, f"**{v.verdict}**",
                         ", ".join(f"{p}: {'-' if j.result is None else 'yes' if j.result else 'no'}"
                                   for p, j in v.by_protocol.items()), explain(v, preset.protocols)]
                        for v in verdicts]))
    parts.append(heading("The cells that decide each claim", 3))
    for v in verdicts:
        lines = [line for j in v.by_protocol.values() for line in j.evidence]
        parts.append(pre(f"claim {v.claim_id} ({v.verdict}):\n" + "\n".join(lines)))
    parts += figure_parts(cells, pooled, names, losses, val, fig_dir, log, preset)
    parts.append(heading("Files"))
    parts.append(para(f"`atlas.csv`: {len(cells)} cells, one per stage x protocol x model x seed x step x block x "
                      "mask, with the spread over prompts (columns explained in `atlas_columns.json`); "
                      "`claims.json`: the verdicts with their cells; `figures/`: the PNGs."))
    parts.append(table(["stage", "protocol", "results"], [[d.stage, d.protocol, str(d.path / "results.jsonl")]
                                                          for d in log.dirs]))
    md, page = write_reports(parts, out, f"lmrep atlas ({preset.name})")
    return {"atlas.csv": csv_path, "claims.json": out / "claims.json", "report.md": md, "report.html": page}


def run_facts(preset: AtlasPreset, prompts: PromptSet, log: StageLog, times: dict[str, float], device: str,
              wall: float, val: dict[str, dict[str, Any]]) -> list[Part]:
    """What was run: prompts, settings, protocols, models, budgets, time."""
    s = preset.probe
    lengths = prompts.lengths.tolist()
    parts = [heading("What was run"), table(["", ""], [
        ["preset", f"{preset.name} (budget: {preset.budget or 'not stated'})"], ["device", device],
        ["prompts", f"{len(prompts)}: the source's prompt \"{prompts.texts[0]}\" ({lengths[0]} tokens) and "
                    f"{len(prompts) - len(preset.prompts.extra)} validation stories (never training text) cut to "
                    f"{preset.prompts.tokens} tokens"],
        ["probe", f"{s.optimizer}, lr {s.lr or 'family default'}, {s.steps} steps (patience {s.patience}), "
                  f"loss {s.loss_fn}, top-k {s.top_k}, seed {s.seed}"],
        ["work time (this --out, all runs)", ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()) or "none"],
        ["this invocation", f"{wall / 60:.1f} min"]])]
    parts.append(heading("Protocols", 3))
    parts.append(table(["name", "what", "context", "free", "method", "masks up to", "widths up to", "prompts",
                        "available"],
                       [[p.name, p.label + (" (the source's)" if p.source else ""), p.context, p.free, p.method,
                         "all" if p.max_mask is None else p.max_mask,
                         "all" if p.max_d_model is None else p.max_d_model,
                         len(p.prompt_set(prompts)),
                         "yes" if p.settings(preset.probe) is not None else "**not available** in this lmrep"]
                        for p in preset.protocols]))
    parts.append(heading("Untrained sweeps", 3))
    parts.append(table(["sweep", "family", "config", "d_model", "seeds", "blocks", "masks"],
                       [[w.name, w.family, ", ".join(f"{k}={v}" for k, v in w.config.items()),
                         ",".join(map(str, w.d_models)), ",".join(map(str, w.seeds)), ",".join(map(str, w.blocks)),
                         ",".join(str(m) for m in preset.masks if m < min(lengths))] for w in preset.untrained]))
    t = preset.trained
    tokens = t.max_steps * t.batch_size * t.context_length
    epochs = sorted({f"{t.max_steps / v['batches_per_epoch']:.3g}" for v in val.values() if v.get("batches_per_epoch")})
    parts.append(heading("Trained families", 3))
    parts.append(para(f"Families {', '.join(f.name for f in t.families) or 'none'} at d_model "
                      f"{', '.join(map(str, t.d_models))}, {t.n_blocks} blocks, context {t.context_length}, the same "
                      f"tokenizer and data, AdamW lr {t.lr} with {t.warmup_steps} warm-up steps and cosine decay, "
                      f"{t.max_steps} steps of {t.batch_size} x {t.context_length} tokens = {tokens:,} training "
                      f"tokens each ({' / '.join(epochs) or '?'} epochs of the training split); checkpoints "
                      f"probed at steps {', '.join(map(str, t.schedule.steps(t.max_steps)))}; blocks "
                      f"{', '.join(map(str, t.blocks))}, masks {', '.join(map(str, t.masks))}, "
                      f"{'every prompt' if t.prompts is None else f'the first {t.prompts} prompts'}."))
    if log.unavailable:
        parts.append(para("Not measured: " + "; ".join(log.unavailable) + "."))
    return parts


def figure_parts(cells: list[dict[str, Any]], pooled: list[dict[str, Any]], names: list[str],
                 losses: dict[str, dict[str, Any]], val: dict[str, dict[str, Any]], fig_dir: Path, log: StageLog,
                 preset: AtlasPreset) -> list[Part]:
    """The figures, with the validation-loss table beside the source author's numbers."""
    parts = [heading("Untrained models: recovery vs width")]
    path = figures.untrained_vs_width(pooled, names, fig_dir)
    parts.append(image(path, "untrained sweeps: top-1 recovery vs d_model, first and last block, seeds and prompts "
                       "pooled, 95% intervals") if path else para("No untrained sweep in this run."))
    parts.append(heading("Validation loss"))
    if val:
        parts.append(image(figures.validation_losses(val, fig_dir), "final validation loss (95% interval over "
                           "validation batches) beside the source author's numbers"))
        parts.append(table(["run", "lmrep val loss (nats)", "95% interval", "source author's (nats)"],
                           [[r, v["val_loss"], f"[{v['val_loss_lo']:.2f}, {v['val_loss_hi']:.2f}]",
                             figures.SOURCE_VAL_LOSS.get((v["arch"], v["d_model"]), "not reported")]
                            for r, v in sorted(val.items())]))
        parts.append(para("The source author's numbers are theirs, on a much larger budget (8 layers, full "
                          "TinyStories, ~12 h on one RTX 3060), not lmrep measurements; lmrep's are on this "
                          "preset's token budget and the local TinyStories copy."))
    else:
        parts.append(para("No trained family in this run."))
    path = figures.families_vs_step(cells, names, fig_dir)
    if path:
        parts.append(heading("Trained families side by side"))
        parts.append(image(path, "every trained family: top-1 recovery vs training step per protocol, first block "
                           "solid, last dashed, 95% band over prompts"))
    for run in sorted({c["run"] for c in cells if c["trained"]}):
        parts.append(heading(f"Trained {run}", 3))
        for p in figures.trained_curves([c for c in cells if c["run"] == run], names, losses, fig_dir):
            parts.append(image(p, f"{run}: loss, and recovery vs training step per protocol (95% band over prompts)"))
        for p in figures.trained_heatmaps([c for c in cells if c["run"] == run], names, fig_dir):
            parts.append(image(p, f"{run}: block x checkpoint heatmaps per protocol (value, ± half-width of the "
                               "95% interval)"))
    ceiling = next((p.name for p in preset.protocols if p.method == "exact" and p.settings(preset.probe)), None)
    source = next((p.name for p in preset.protocols if p.source), None)
    parts.append(heading("Gradient descent beside its exact ceiling"))
    path = figures.gd_vs_ceiling(pooled, source, ceiling, fig_dir) if ceiling and source else None
    parts.append(image(path, "non-self recovery: GD vs the exact ceiling, per cell") if path else
                 para("The exact ceiling is not available in this lmrep (ProbeSettings has no method=exact), "
                      "so GD is reported without it."))
    return parts
