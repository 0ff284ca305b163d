"""`python -m lmrep.atlas --preset {smoke,cpu,gpu} --out runs/atlas`: the source's whole experiment in one command.

`--preset NAME` reads `configs/atlas/NAME.yaml` (or a path to any preset YAML);
every preset field can then be overridden (`--trained.max_steps 200`,
`--prompts.stories 8`, `--probe.steps 300`). The stages (untrained sweeps,
trained families, their probes per protocol) skip work already done, so the
same command resumes a killed run and a finished one re-writes only the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from data.files import write_text_atomic
from lmrep.atlas.preset import AtlasPreset
from lmrep.atlas.stages import StageLog, trained_stage, untrained_stage
from lmrep.prompts import PromptSet, encode_prompts, validation_prompts
from lmrep.runs import check_output_dir

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "atlas"
TIMES_FILE = "atlas_times.json"  # seconds of real work per stage, summed over the runs into one --out


def preset_path(name: str) -> Path:
    """configs/atlas/<name>.yaml, or `name` itself when it is a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise ValueError(f"unknown preset {name!r}: choose one of {known}, or give a preset YAML file")
    return path


def build_parser() -> ArgumentParser:
    """--out, --preset (a --config under another name) and every AtlasPreset field."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog="python -m lmrep.atlas", exit_on_error=False, default_env=False,
                            description="Run the atlas: untrained sweeps, trained families, every probe protocol, "
                            "atlas.csv, report.md/html and the claims table.")
    parser.add_argument("--config", action=ActionConfigFile, help="a preset YAML (what --preset NAME reads)")
    parser.add_argument("--out", type=str, required=True, help="output folder (re-run the command to resume)")
    parser.add_argument("--stages", type=list[str], default=["untrained", "trained"],
                        help="stages to run before the report: untrained and/or trained")
    parser.add_argument("--estimate", action="store_true",
                        help="print the preset's estimated run time (work counted x rates measured here) and stop")
    parser.add_class_arguments(AtlasPreset, None)
    return parser


def parse(argv: list[str]) -> tuple[AtlasPreset, Path, list[str]]:
    """A command line -> (preset, output folder, stages); --preset NAME is read first, later flags override it."""
    preset, out, stages, _ = parse_all(argv)
    return preset, out, stages


def parse_all(argv: list[str]) -> tuple[AtlasPreset, Path, list[str], bool]:
    """parse, and whether --estimate was given."""
    args: list[str] = []
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name == "--preset":
            args.insert(0, value if eq else (argv[i + 1] if i + 1 < len(argv) else ""))
            args.insert(0, "--config")
        elif not (i > 0 and argv[i - 1] == "--preset"):
            args.append(arg)
    if args[:1] == ["--config"]:
        args[1] = str(preset_path(args[1]))
    try:
        cfg = build_parser().parse_args(args)
    except argparse.ArgumentError as err:
        raise ValueError(" ".join(line.strip() for line in str(err).splitlines() if line.strip())) from None
    init = build_parser().instantiate_classes(cfg)
    fields = {f.name for f in dataclasses.fields(AtlasPreset)}
    preset = AtlasPreset(**{k: init[k] for k in fields})
    bad = sorted(set(cfg.stages) - {"untrained", "trained"})
    if bad:
        raise ValueError(f"unknown stage(s) {', '.join(bad)}: choose untrained and/or trained")
    return preset, Path(cfg.out), list(cfg.stages), bool(cfg.estimate)


def resolve_device(device: str) -> str:
    """auto -> cuda when available, else cpu; cuda without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but no CUDA GPU is available: use --device cpu or auto")
    return device


def load_prompts(preset: AtlasPreset, tokenizer: Any) -> PromptSet:
    """The source's prompt(s) first, then the validation stories, all cut to T tokens."""
    stories = validation_prompts(preset.prompts.stories, preset.data.source, preset.data.data_dir,
                                 cache_dir=preset.data.cache_dir) if preset.prompts.stories else []
    return encode_prompts([*preset.prompts.extra, *stories], tokenizer, max_tokens=preset.prompts.tokens)


def print_estimate(preset: AtlasPreset, out: Path) -> str:
    """The preset's estimated cost (lmrep.atlas.estimate), printed and kept in `out/estimate.txt`."""
    from data.tinystories import TinyStoriesDataModule
    from lmrep.atlas.estimate import estimate, format_estimate

    device = resolve_device(preset.device)
    dm = TinyStoriesDataModule(source=preset.data.source, data_dir=preset.data.data_dir,
                               cache_dir=preset.data.cache_dir)
    items = estimate(preset, load_prompts(preset, dm.tokenizer), dm.tokenizer, device)  # prints each item
    text = format_estimate(items, preset)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "estimate.txt", text + "\n")
    print(format_estimate(items, preset, with_items=False))
    print(f"estimate: {out / 'estimate.txt'}")
    return text


def run(preset: AtlasPreset, out: Path, stages: list[str]) -> dict[str, Path]:
    """Every stage of the preset, then atlas.csv, the figures, report.md/html; returns the main files."""
    from data.tinystories import TinyStoriesDataModule
    from lmrep.atlas.document import write_atlas
    from lmrep.atlas.wandb_log import log_probes

    check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(preset.device)
    started = time.perf_counter()
    dm = TinyStoriesDataModule(source=preset.data.source, data_dir=preset.data.data_dir,
                               cache_dir=preset.data.cache_dir)
    prompts = load_prompts(preset, dm.tokenizer)
    log = StageLog()
    if "untrained" in stages:
        untrained_stage(preset, prompts, dm.tokenizer, dm.tokenizer_hash, out, device, log)
    if "trained" in stages and preset.trained.families:
        trained_stage(preset, prompts, dm.tokenizer, dm.tokenizer_hash, out, device, log, on_probed=log_probes)
    times = json.loads((out / TIMES_FILE).read_text()) if (out / TIMES_FILE).exists() else {}
    for stage, seconds in log.seconds.items():
        times[stage] = times.get(stage, 0.0) + seconds
    write_text_atomic(out / TIMES_FILE, json.dumps(times, indent=1))
    files = write_atlas(preset, out, prompts, log, times, device, time.perf_counter() - started)
    for name, path in files.items():
        print(f"{name}: {path}")
    return files


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input ends in one `error:` line (a traceback with LMREP_DEBUG=1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(os.environ.get("LMREP_DEBUG"))
    try:
        preset, out, stages, only_estimate = parse_all(argv)
        if only_estimate:
            print_estimate(preset, out)
        else:
            run(preset, out, stages)
    except KeyboardInterrupt:
        print("interrupted: every finished probe and checkpoint is kept; run the same command to resume",
              file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        if debug:
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0
