"""The atlas's stages: untrained sweeps and trained families, probed under every protocol.

Each (sweep or trained run) x protocol probes into a folder of its own,
`<stage>/<name>-<key>/<protocol>-<settings id>/`, through `lmrep.runs.run_probe`,
so results.jsonl resumes after a kill and work already there is skipped; the
folder names carry the hashes of what decides their content (model specs,
probe settings and prompts), so a changed setting measures anew beside the old
results instead of mixing with them. `atlas_meta.json` in each folder maps the
rows' source ids to the model facts atlas.csv needs (architecture, width, seed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data.files import write_text_atomic
from lmrep.atlas.preset import AtlasPreset, Protocol, Sweep, resolve_blocks
from lmrep.atlas.training import DONE_FILE, LOSSES_FILE, read_json, train_family, training_config
from lmrep.prompts import PromptSet
from lmrep.runs import ModelSource, OutputLock, checkpoint_sources, complete_groups, read_results, run_probe
from lmrep.runs import settings_id, untrained_source_id
from models import MODEL_FAMILIES, build_model

META_FILE = "atlas_meta.json"


def short_hash(obj: Any) -> str:
    """8 hex digits of a JSON-able value's sha256."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


@dataclass
class ProbedDir:
    """One folder of probe results: which stage and protocol, and the facts of each source probed there."""

    path: Path
    stage: str
    protocol: str
    meta: dict[str, dict[str, Any]]


@dataclass
class StageLog:
    """What the stages did: the folders they filled, and the seconds spent on work that was not done before."""

    dirs: list[ProbedDir] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    trained_runs: dict[str, Path] = field(default_factory=dict)
    unavailable: list[str] = field(default_factory=list)

    def spent(self, stage: str, seconds: float) -> None:
        """Add seconds of real work to a stage's time."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


class UntrainedSource(ModelSource):
    """An untrained model built on first load (so a sweep holds one model in memory at a time)."""

    def __init__(self, name: str, family: str, config: dict[str, Any], seed: int) -> None:
        if family not in MODEL_FAMILIES:
            raise ValueError(f"unknown model family {family!r}: choose one of {', '.join(sorted(MODEL_FAMILIES))}")
        # The identity a built model's model_spec would give (its full config), without building it.
        spec = {"family": family, "config": dataclasses.asdict(MODEL_FAMILIES[family].config_class(**config))}
        super().__init__(name=name, step=0, source_id=untrained_source_id(spec, seed))
        self.family, self.config, self.seed = family, config, seed

    def load(self, tokenizer_hash: str | None, device: torch.device | str | None = None) -> Any:
        torch.manual_seed(self.seed)
        model = build_model(self.family, self.config)
        return model if device is None else model.to(device)


def probe_dir(sources: list[ModelSource], meta: dict[str, dict[str, Any]], prompts: PromptSet, tokenizer: Any,
              tok_hash: str, blocks: list[int], masks: list[int], protocol: Protocol, preset: AtlasPreset,
              folder: Path, stage: str, device: str, log: StageLog, desc: str) -> None:
    """Probe `sources` under one protocol into `folder/<protocol>-<settings id>`, skipping what is there."""
    settings = protocol.settings(preset.probe)
    if settings is None:
        note = f"{protocol.name} ({protocol.label}): not available in this lmrep (method={protocol.method})"
        if note not in log.unavailable:
            log.unavailable.append(note)
        return
    sources = [s for s in sources if protocol.measures(int(meta[s.source_id]["d_model"]))]
    if not sources:
        return
    prompts = protocol.prompt_set(prompts)
    out = folder / f"{protocol.name}-{settings_id(settings, prompts)}"
    masks = protocol.masks(masks)
    todo = {(s.source_id, protocol.context, b, m) for s in sources for b in blocks for m in masks}
    done = complete_groups(read_results(out), len(prompts)) if out.exists() else set()
    if todo - done:
        start = time.perf_counter()
        with OutputLock(out):
            write_text_atomic(out / META_FILE, json.dumps(meta, indent=1))
            run_probe(sources, prompts, tokenizer, blocks_spec=blocks, masks=masks, settings=settings,
                      contexts=[protocol.context], out_dir=out, tokenizer_hash=tok_hash, device=device,
                      desc=desc, leave=False)
        log.spent(stage, time.perf_counter() - start)
        state = "probed"
    else:
        state = "done already"
    print(f"{desc}: {len(sources)} model(s), {state}: {out / 'results.jsonl'}")
    log.dirs.append(ProbedDir(out, stage, protocol.name, meta))


def untrained_stage(preset: AtlasPreset, prompts: PromptSet, tokenizer: Any, tok_hash: str, out: Path,
                    device: str, log: StageLog) -> None:
    """Every sweep x protocol: its widths x seeds, blocks first and last, the masks shorter than every prompt."""
    masks = [m for m in preset.masks if m < int(prompts.lengths.min())]
    for sweep in preset.untrained:
        sources, meta = sweep_sources(sweep)
        n_blocks = int(sweep.config.get("n_blocks", 8))
        blocks = resolve_blocks(sweep.blocks, n_blocks)
        folder = out / "untrained" / f"{sweep.name}-{short_hash(dataclasses.asdict(sweep))}"
        for protocol in preset.protocols:
            probe_dir(sources, meta, prompts, tokenizer, tok_hash, blocks, masks, protocol, preset, folder,
                      "untrained", device, log, desc=f"untrained {sweep.name} [{protocol.name}]")


def sweep_sources(sweep: Sweep) -> tuple[list[ModelSource], dict[str, dict[str, Any]]]:
    """The sweep's models (lazy), and their facts by source id."""
    sources, meta = [], {}
    for d in sweep.d_models:
        config = {**sweep.config, "d_model": d}
        for seed in sweep.seeds:
            source = UntrainedSource(f"{sweep.name}-d{d}-seed{seed}", sweep.family, config, seed)
            sources.append(source)
            meta[source.source_id] = model_facts(sweep.name, sweep.family, config, seed, trained=False)
    return sources, meta


def model_facts(name: str, family: str, config: dict[str, Any], seed: int, *, trained: bool) -> dict[str, Any]:
    """The columns of atlas.csv that describe a model."""
    arch = "llama" if family == "llama" else config.get("mixing", "flat")
    return {"run": name, "family": family, "arch": arch, "d_model": int(config["d_model"]),
            "n_blocks": int(config.get("n_blocks", 8)), "expansion": config.get("expansion"),
            "n_parallel": config.get("n_parallel"), "seed": seed, "trained": trained}


def trained_stage(preset: AtlasPreset, prompts: PromptSet, tokenizer: Any, tok_hash: str, out: Path, device: str,
                  log: StageLog, on_probed: Callable[[str, Path, list[ProbedDir]], None] | None = None) -> None:
    """Every family x width: train on the schedule (or find it trained), then probe every checkpoint per protocol."""
    training = preset.trained
    if training.prompts is not None:
        prompts = Protocol("trained", "", prompts=training.prompts).prompt_set(prompts)
    masks = [m for m in training.masks if m < int(prompts.lengths.min())]
    blocks = resolve_blocks(training.blocks, training.n_blocks)
    for d in training.d_models:
        for family in training.families:
            cfg = training_config(family, training, d, preset.data, Path("."), device)
            # Keyed by everything that decides the weights (not where they go, nor the cache's place).
            key = short_hash({**{k: v for k, v in cfg.items() if k != "run_dir"},
                              "data": {k: v for k, v in cfg["data"].items() if k != "cache_dir"}})
            run_dir = out / "trained" / f"{family.name}-d{d}-{key}"
            cfg["run_dir"] = str(run_dir)
            start = time.perf_counter()
            trained = train_family(cfg, run_dir)
            if trained:
                log.spent("training", time.perf_counter() - start)
            print(f"trained {family.name} d={d}: {'trained' if trained else 'done already'}: {run_dir} "
                  f"(checkpoints/, {LOSSES_FILE}, W&B run in wandb/)")
            log.trained_runs[f"{family.name}-d{d}"] = run_dir
            sources = [s for s in checkpoint_sources(run_dir / "checkpoints")
                       if s.step in set(training.schedule.steps(training.max_steps))]
            model_cfg = cfg["model"]["model"]["init_args"]["config"]
            fam = "llama" if "llama" in cfg["model"]["model"]["class_path"] else "mixer"
            facts = model_facts(f"{family.name}-d{d}", fam, model_cfg, training.seed, trained=True)
            meta = {s.source_id: facts for s in sources}
            first = len(log.dirs)
            for protocol in preset.protocols:
                probe_dir(sources, meta, prompts, tokenizer, tok_hash, blocks, masks, protocol, preset,
                          run_dir / "probe", "trained probes", device, log,
                          desc=f"trained {family.name} d={d} [{protocol.name}]")
            if on_probed is not None:
                on_probed(f"{family.name}-d{d}", run_dir, log.dirs[first:])


def is_trained(run_dir: Path) -> bool:
    """True when the run in run_dir reached its last step."""
    return (run_dir / DONE_FILE).exists()


def losses_of(run_dir: Path) -> dict[str, Any]:
    """The run's [step, loss] curves (losses.json)."""
    return read_json(run_dir / LOSSES_FILE)
