"""`python -m lmrep.atlas --preset cpu --out DIR --estimate`: what a preset will cost, before running it.

Counts the work of every stage (training steps per family, probe rows per sweep,
family and protocol) and multiplies it by rates measured here, on this machine,
in a minute or two: a few optimiser steps of each trained family on random
tokens, and per model shape and protocol one probe at the costliest cell
(the last block, the protocol's largest mask): gradient methods over every
prompt for a few steps, scaled to the preset's steps; the exact solver on one
prompt, scaled to all. The figure is an estimate (an upper
bound for the probes, whose shallower blocks and smaller masks cost less), not a
measurement; the real work time of a run is in its report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmrep.atlas.preset import AtlasPreset, Protocol, resolve_blocks
from lmrep.atlas.stages import UntrainedSource
from lmrep.atlas.training import training_config
from lmrep.module import next_token_loss
from lmrep.probe.settings import EXACT
from lmrep.prompts import PromptSet
from lmrep.runs import run_probe
from models import build_model

SAMPLE_PROMPTS = 1  # prompts probed per measurement (rates are per prompt row)
SAMPLE_STEPS = 20  # probe steps per measurement (scaled to the preset's steps)
SAMPLE_TRAIN_STEPS = 3  # timed optimiser steps per trained family (after one untimed)


@dataclass
class Item:
    """One line of the estimate: a stage's unit of work, how much of it, and its measured cost."""

    stage: str
    what: str
    count: int
    unit: str
    seconds_each: float

    @property
    def seconds(self) -> float:
        return self.count * self.seconds_each


def subset(prompts: PromptSet, n: int) -> PromptSet:
    """The first n prompts (the source's prompt first)."""
    return PromptSet(ids=prompts.ids[:n], lengths=prompts.lengths[:n], texts=prompts.texts[:n])


RATES: dict[str, float] = {}  # seconds per row by model shape and method, measured once per process


def probe_row_seconds(family: str, config: dict[str, Any], protocol: Protocol, preset: AtlasPreset,
                      prompts: PromptSet, tokenizer: Any, block: int, mask: int, device: str) -> float | None:
    """Seconds per row of one model shape under one protocol: measured once per shape and method (the gradient
    protocols share the padded context's rate, the costliest of theirs), so an estimate takes minutes."""
    settings = protocol.settings(preset.probe)
    if settings is None or not protocol.measures(int(config["d_model"])):
        return None
    gradient = settings.method != EXACT
    key = json.dumps([family, config, settings.method, block, mask if not gradient else None], sort_keys=True)
    if key not in RATES:
        measured = dataclasses.replace(protocol, context="padded", free="all") if gradient else protocol
        RATES[key] = measure_row_seconds(family, config, measured, preset, prompts, tokenizer, block, mask, device)
    return RATES[key]


def measure_row_seconds(family: str, config: dict[str, Any], protocol: Protocol, preset: AtlasPreset,
                        prompts: PromptSet, tokenizer: Any, block: int, mask: int, device: str) -> float:
    """Seconds per (prompt, block, mask) row of one model shape under one protocol, at the given cell.

    Gradient methods: every prompt in one batch (as a run probes them) for SAMPLE_STEPS steps, the fastest of
    two runs, scaled to the preset's steps (the fixed cost scaled too: an upper bound). The exact solver:
    SAMPLE_PROMPTS prompt(s), its cost being per prompt.
    """
    settings = protocol.settings(preset.probe)
    assert settings is not None
    prompts = protocol.prompt_set(prompts)
    source = UntrainedSource("estimate", family, config, seed=0)

    def timed(sample: PromptSet, probe_settings: Any, repeats: int = 2) -> float:
        """The fastest of `repeats` runs (a shared machine's other work only ever adds time)."""
        best = math.inf
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as scratch:
                start = time.perf_counter()
                run_probe([source], sample, tokenizer, blocks_spec=[block], masks=[mask], settings=probe_settings,
                          contexts=[protocol.context], out_dir=Path(scratch), progress=False, device=device)
                best = min(best, time.perf_counter() - start)
        return best

    if settings.method == EXACT:
        sample = subset(prompts, SAMPLE_PROMPTS)
        return timed(sample, settings, repeats=1) / len(sample)
    steps = min(settings.steps, SAMPLE_STEPS)
    seconds = timed(prompts, dataclasses.replace(settings, steps=steps, patience=None))
    return seconds * settings.steps / steps / len(prompts)


def train_step_seconds(family: str, config: dict[str, Any], batch_size: int, lr: float, device: str) -> float:
    """Seconds per optimiser step (forward, backward, AdamW) of one family on random tokens."""
    torch.manual_seed(0)
    model = build_model(family, config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    tokens = torch.randint(0, int(config["vocab_size"]), (batch_size, int(config["context_length"])), device=device)
    seconds = 0.0
    for i in range(SAMPLE_TRAIN_STEPS + 1):
        start = time.perf_counter()
        loss, _ = next_token_loss(model(tokens), tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up (allocations, kernels)
            seconds += time.perf_counter() - start
    return seconds / SAMPLE_TRAIN_STEPS


class Items(list):
    """The estimate's items, each printed as it is measured (a slow measurement shows where the cost is)."""

    def append(self, item: Item) -> None:
        super().append(item)
        print(format_item(item), flush=True)


def format_item(item: Item) -> str:
    """One measured item in one line."""
    return (f"  {item.stage:15s} {item.what:40s} {item.count:8d} {item.unit:18s} x {item.seconds_each:8.3f} s "
            f"= {item.seconds / 60:7.1f} min")


def estimate(preset: AtlasPreset, prompts: PromptSet, tokenizer: Any, device: str) -> list[Item]:
    """Every stage's work, counted, with its measured cost per unit."""
    items: list[Item] = Items()
    sweep_masks = [m for m in preset.masks if m < int(prompts.lengths.min())]
    for sweep in preset.untrained:
        n_blocks = int(sweep.config.get("n_blocks", 8))
        blocks = resolve_blocks(sweep.blocks, n_blocks)
        for d in sweep.d_models:
            config = {**sweep.config, "d_model": d}
            for protocol in preset.protocols:
                masks = protocol.masks(sweep_masks)
                if not masks:
                    continue
                each = probe_row_seconds(sweep.family, config, protocol, preset, prompts, tokenizer, max(blocks),
                                         max(masks), device)
                if each is not None:
                    items.append(Item("untrained", f"{sweep.name} d={d} [{protocol.name}]",
                                      len(sweep.seeds) * len(protocol.prompt_set(prompts)) * len(blocks) * len(masks),
                                      "probe rows", each))
    training = preset.trained
    if training.prompts is not None:
        prompts = Protocol("trained", "", prompts=training.prompts).prompt_set(prompts)
    train_masks = [m for m in training.masks if m < int(prompts.lengths.min())]
    blocks = resolve_blocks(training.blocks, training.n_blocks)
    checkpoints = len(training.schedule.steps(training.max_steps))
    validations = training.max_steps // max(1, min(training.val_every, training.max_steps)) + 1
    for d in training.d_models:
        for family in training.families:
            cfg = training_config(family, training, d, preset.data, Path("."), device)
            model_cfg = dict(cfg["model"]["model"]["init_args"]["config"])
            fam = "llama" if "llama" in cfg["model"]["model"]["class_path"] else "mixer"
            step = train_step_seconds(fam, model_cfg, training.batch_size, training.lr, device)
            items.append(Item("training", f"{family.name} d={d}", training.max_steps, "optimiser steps", step))
            # Validation: forward passes only, about a third of a training step per batch.
            items.append(Item("training", f"{family.name} d={d} validation", validations * training.val_batches,
                              "validation batches", step / 3))
            for protocol in preset.protocols:
                masks = protocol.masks(train_masks)
                if not masks:
                    continue
                each = probe_row_seconds(fam, model_cfg, protocol, preset, prompts, tokenizer, max(blocks),
                                         max(masks), device)
                if each is not None:
                    items.append(Item("trained probes", f"{family.name} d={d} [{protocol.name}]",
                                      checkpoints * len(protocol.prompt_set(prompts)) * len(blocks) * len(masks),
                                      "probe rows", each))
    return items


def format_estimate(items: list[Item], preset: AtlasPreset, *, with_items: bool = True) -> str:
    """The estimate as lines: every item (unless with_items is False), each stage's total and the whole."""
    lines = [f"estimate for the {preset.name} preset (budget: {preset.budget or 'not stated'}); rates measured "
             f"now on this machine, probes at their costliest cell:"]
    lines += [format_item(item) for item in items] if with_items else []
    stages: dict[str, float] = {}
    for item in items:
        stages[item.stage] = stages.get(item.stage, 0.0) + item.seconds
    for stage, seconds in stages.items():
        lines.append(f"  {stage}: {seconds / 60:.1f} min")
    lines.append(f"  total: {sum(stages.values()) / 60:.1f} min ({sum(stages.values()) / 3600:.2f} h)")
    return "\n".join(lines)
