"""The probe command line: invert every block of a checkpoint, a run's checkpoints, or an untrained model.

    python probe.py --checkpoint runs/quickstart/checkpoints --out runs/quickstart/probe
    python probe.py --init configs/mixer_flat.yaml --model.d_model 64 --context padded --mask 0,1 --out out/flat
    python probe.py --config configs/probes/untrained_flat.yaml --out out/flat
    python probe.py --checkpoint runs/big/checkpoints --accelerator gpu --devices 4 --out runs/big/probe

A jsonargparse CLI over `ProbeRequest` (what to probe, prompts, outputs) and
`ProbeSettings` (how each inversion runs): their field docstrings are the
`--help`, a YAML file can hold any of them (`--config`), and with `--init` every
field of the family's config dataclass can be overridden (`--model.<field>`).
Flags may be spelt with dashes or underscores (`--num-prompts`, `--num_prompts`);
`--loss` is `--loss_fn`. The work itself is `lmrep.pipeline.probe_and_report`,
the same orchestration ProbeCallback runs during training.

Writes results.jsonl, summary.csv/json, PNG curves and heatmaps, report.html and
an (offline unless credentials) W&B run into --out. With `--devices N` (and
`--num-nodes` under SLURM) Lightning Fabric starts one process per device (DDP;
gloo on CPU, NCCL on GPUs); the prompts are split over them and rank 0 writes
everything once: the rows one process writes (to floating-point rounding;
docs/scaling.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace, set_parsing_settings

from lmrep.configs import read_config
from lmrep.checkpoints import CheckpointError, list_checkpoints, load_checkpoint
from lmrep.pipeline import ProbePlan, WandbRun, probe_and_report
from lmrep.probe import CONTEXTS, ProbeSettings, calibrate_lr
from lmrep.prompts import PromptSet, encode_prompts, first_too_long, parse_blocks, parse_ints, read_prompt_lines, validation_prompts
from lmrep.runs import RESULTS_FILE, ModelSource, check_output_dir, checkpoint_sources, untrained_source_id
from lmrep.sharding import Shard
from models import build_model, model_class, model_spec

# Earlier names of settings fields, and train.py's spelling of the data options.
FLAG_ALIASES = {"--loss": "--loss_fn", "--data.source": "--data_source", "--data.data_dir": "--data_dir"}
DEFAULT_STORY_TOKENS = 16  # validation stories are cut to this many tokens unless --tokens says otherwise
# Settings fields the request sets: the contexts are a list here, allowed tokens come from a file,
# and the seed is the request's.
_SETTINGS_FROM_REQUEST = {"context", "allowed_tokens", "seed"}


@dataclass
class ProbeRequest:
    """What to probe, with which prompts, and where the outputs go."""

    out: str
    """Output directory: results.jsonl, summaries, plots, report.html, the W&B run."""
    checkpoint: str | None = None
    """A checkpoint file, or a directory: every checkpoint in step order."""
    init: str | None = None
    """A training config (configs/*.yaml): probe the untrained model it starts from (fields: --model.*)."""
    seed: int = 0
    """Seed of the untrained model (--init), and of the probe unless --probe_seed is given."""
    probe_seed: int | None = None
    """Seed of the probe's start noise and baseline shift (default: --seed). The probe's random streams are
    hashed with their purpose, so they never repeat a model's initial draws whatever the two seeds are."""
    prompts: str | None = None
    """A file with one prompt per line (default: validation stories)."""
    num_prompts: int = 8
    """Validation stories to use as prompts."""
    tokens: int | None = None
    """Cut each prompt to this many tokens (default: 16 for validation stories; whole lines of --prompts)."""
    blocks: str = "all"
    """'all' (1..n) or a list like 1,4,8 (0 is the embedding itself)."""
    mask: str | list[int] = "0,1"
    """Masks m, e.g. 0,1,3 (m = 0: self only)."""
    context: str | list[str] = "prompt"
    """prompt, padded, or both as prompt,padded."""
    allowed_tokens: str | None = None
    """Restrict decoding to the tokens of the words in this text file."""
    tokenizer: str | None = None
    """tokenizer.json; with --checkpoint it must be the one the checkpoint was trained with."""
    data_source: str | None = None
    """Where the default prompts (validation stories) and an --init model's tokenizer come from (also
    --data.source): auto (the local folder when one is found, else the hub), local or hub; default: the
    --init config's data.source, else auto."""
    data_dir: str | None = None
    """Local TinyStories folder (also --data.data_dir; default: the --init config's, else $LMREP_DATA_DIR,
    else ../shared/data/tinystories beside the checkout)."""
    accelerator: str = "cpu"
    """cpu, gpu/cuda, or auto (Lightning's names)."""
    devices: int = 1
    """Processes per node, one per device (DDP via Lightning Fabric: prompts are split over them)."""
    num_nodes: int = 1
    """Nodes (SLURM: srun starts the processes)."""


def _family_of_config(init: str) -> tuple[type, dict[str, Any], dict[str, Any]]:
    """The model family class named by a training config, its config values there, and the config's data section."""
    path = Path(init)
    cfg = read_config(path)  # a family file over configs/base.yaml, as train.py reads it
    try:
        spec = cfg["model"]["model"]
        class_path, config = spec["class_path"], dict(spec["init_args"]["config"])
    except (KeyError, TypeError):
        raise ValueError(f"{path} has no model.model.class_path / init_args.config section") from None
    return model_class(class_path), config, cfg.get("data") or {}


def _init_path(argv: list[str]) -> str | None:
    """The --init value, from the command line or a --config file, before the full parse."""
    found = None
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name == "--config":
            path = Path(value if eq else (argv[i + 1] if i + 1 < len(argv) else ""))
            if path.is_file():
                found = (yaml.safe_load(path.read_text()) or {}).get("init", found)
        elif name == "--init":
            found = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return found


# Float options, whose inf/nan the parser (YAML) would read as strings: they go as YAML's .inf/.nan.
_FLOAT_FLAGS = {f"--{f.name}" for f in dataclasses.fields(ProbeSettings) if "float" in str(f.type)}
_YAML_SPECIAL = {"inf": ".inf", "+inf": ".inf", "-inf": "-.inf", "nan": ".nan"}


def normalise_flags(argv: list[str]) -> list[str]:
    """Dashes in flag names become underscores (the earlier spelling), old names their new ones, inf/nan YAML's."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in _FLOAT_FLAGS and arg.lower() in _YAML_SPECIAL:
            arg = _YAML_SPECIAL[arg.lower()]
        elif arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg.partition("=")
            name = "--" + name[2:].replace("-", "_")
            name = FLAG_ALIASES.get(name, name)
            if eq and name in _FLOAT_FLAGS:
                value = _YAML_SPECIAL.get(value.lower(), value)
            arg = name + eq + value
        out.append(arg)
    return out


def build_parser(model_config: tuple[type, dict[str, Any]] | None = None) -> ArgumentParser:
    """The probe flags: the request, the settings (docstrings as help), and the model fields of --init."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog="probe.py", description="Invert every block of a language model by gradient "
                            "descent.", exit_on_error=False, default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    parser.add_class_arguments(ProbeRequest, None)
    parser.add_class_arguments(ProbeSettings, None, skip=_SETTINGS_FROM_REQUEST)
    parser.add_argument("--calibrate", action=ActionYesNo, default=False,
                        help="pick lr from a small grid on block-1 self recovery")
    parser.add_argument("--wandb", action=ActionYesNo, default=True, help="log a W&B run (--no_wandb: skip it)")
    parser.add_argument("--debug", action=ActionYesNo, default=False, help="full tracebacks on errors")
    if model_config is not None:
        config_class, values = model_config
        parser.add_class_arguments(config_class, "model")
        parser.set_defaults({f"model.{k}": v for k, v in values.items()})
    return parser


@dataclass
class ParsedCommand:
    """A parsed probe.py command line."""

    request: ProbeRequest
    settings: ProbeSettings
    model_config: dict[str, Any] | None
    data_config: dict[str, Any]
    calibrate: bool
    wandb: bool
    debug: bool


def parse(argv: list[str] | None) -> ParsedCommand:
    """Parse (and check) a probe.py command line; errors raise ValueError with one line."""
    args = normalise_flags(list(sys.argv[1:] if argv is None else argv))
    init = _init_path(args)
    family = _family_of_config(init) if init else None
    parser = build_parser(None if family is None else (family[0].config_class, family[1]))
    try:
        cfg: Namespace = parser.parse_args(args)
    except argparse.ArgumentError as err:
        raise ValueError(" ".join(line.strip() for line in str(err).splitlines() if line.strip())) from None
    fields = {f.name for f in dataclasses.fields(ProbeRequest)}
    request = ProbeRequest(**{k: cfg[k] for k in fields})
    settings_fields = {f.name for f in dataclasses.fields(ProbeSettings)} - _SETTINGS_FROM_REQUEST
    seed = request.seed if request.probe_seed is None else request.probe_seed
    settings = ProbeSettings(**{k: cfg[k] for k in settings_fields}, seed=seed)
    if (request.checkpoint is None) == (request.init is None):
        raise ValueError("give exactly one of --checkpoint (a checkpoint or a directory) and --init (a config)")
    model = cfg["model"].as_dict() if family is not None else None
    return ParsedCommand(request=request, settings=settings, model_config=model,
                         data_config=family[2] if family is not None else {}, calibrate=bool(cfg.calibrate),
                         wandb=bool(cfg.wandb), debug=bool(cfg.debug))


def untrained_model(config_path: str | Path, seed: int,
                    overrides: dict[str, Any] | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model a training config would start from (with `overrides` of its config fields), seeded; and its data."""
    cls, values, data = _family_of_config(str(config_path))
    torch.manual_seed(seed)
    return build_model(cls.family, {**values, **(overrides or {})}), data


def load_tokenizer_for(request: ProbeRequest, data_cfg: dict[str, Any]) -> tuple[Any, str]:
    """The tokenizer: --tokenizer, else the one stored in the checkpoint, else the data module's."""
    from data.tokenizer import load_tokenizer, tokenizer_hash

    if request.tokenizer is not None:
        return load_tokenizer(Path(request.tokenizer)), tokenizer_hash(Path(request.tokenizer))
    if request.checkpoint is not None:
        first = Path(request.checkpoint)
        if first.is_dir():
            first = list_checkpoints(first)[0]
        loaded = load_checkpoint(first)
        if loaded.tokenizer is None:
            raise CheckpointError(f"{first} stores no tokenizer: pass --tokenizer")
        return loaded.tokenizer, loaded.tokenizer_hash
    from data.tinystories import TinyStoriesDataModule

    dm = TinyStoriesDataModule(**data_options(request, data_cfg), tokenizer_path=data_cfg.get("tokenizer_path"))
    return dm.tokenizer, dm.tokenizer_hash


def data_options(request: ProbeRequest, data_cfg: dict[str, Any]) -> dict[str, Any]:
    """source, data_dir and cache_dir of the stories: the flags, else the --init config's data section."""
    options = {k: data_cfg[k] for k in ("source", "data_dir", "cache_dir") if data_cfg.get(k) is not None}
    if request.data_source is not None:
        options["source"] = request.data_source
    if request.data_dir is not None:
        options["data_dir"] = request.data_dir
    return options


def launch(request: ProbeRequest, argv: list[str] | None) -> Any:
    """Start one process per device with Lightning Fabric; None for the plain single CPU process.

    Fabric's DDP launcher starts the other local ranks by re-running this command
    line (under SLURM, srun has started them already), so several processes need
    probe.py run as a command, not `main([...])` from inside another program.
    """
    if request.devices < 1 or request.num_nodes < 1:
        raise ValueError(f"--devices and --num-nodes must be >= 1, got {request.devices} and {request.num_nodes}")
    world = request.devices * request.num_nodes
    if world == 1 and request.accelerator == "cpu":
        return None
    if world > 1 and argv is not None and list(argv) != sys.argv[1:]:
        raise ValueError("--devices/--num-nodes > 1 need probe.py run as a command: Lightning starts the other "
                         "processes by re-running the command line")
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=request.accelerator, devices=request.devices, num_nodes=request.num_nodes,
                    strategy="ddp" if world > 1 else "auto")
    fabric.launch()
    return fabric


def main(argv: list[str] | None = None) -> int:
    """Entry point of probe.py; known faults print one line (full traceback with --debug)."""
    debug = bool(os.environ.get("LMREP_DEBUG"))
    command: ParsedCommand | None = None
    try:
        command = parse(argv)
        debug = debug or command.debug
        run(command, launch(command.request, argv))
    except KeyboardInterrupt:
        if Shard.current().is_main and command is not None:
            out = Path(command.request.out)
            print(f"interrupted: {out / RESULTS_FILE} keeps every finished (checkpoint, context, blocks) probe; "
                  "run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FloatingPointError, CheckpointError) as err:
        if debug:
            raise
        if Shard.current().is_main:  # every rank fails alike; one line is enough
            print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run(command: ParsedCommand, fabric: Any = None) -> None:
    """Probe what the command names and write every output into --out.

    With a launched `fabric` this runs on every rank: each probes its share of the
    prompts on its device, and rank 0 alone writes the results, report and W&B run.
    """
    request, settings = command.request, command.settings
    shard = Shard.current() if fabric is not None else Shard()
    device = fabric.device if fabric is not None else None
    for flag, value in (("--tokens", request.tokens), ("--num-prompts", request.num_prompts)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    contexts = _names(request.context)
    bad = [c for c in contexts if c not in CONTEXTS]
    if bad or not contexts:
        raise ValueError(f"unknown context {','.join(bad) or request.context!r}: choose prompt, padded or "
                         "prompt,padded")
    masks = request.mask if isinstance(request.mask, list) else parse_ints(request.mask, "masks")
    check = None
    if shard.is_main:  # a bad --out fails now, before any model is loaded or probed
        try:
            check_output_dir(request.out)
        except ValueError as err:
            check = str(err)
    check = shard.broadcast(check)
    if check is not None:
        raise ValueError(check)
    if request.init is not None:
        model, _ = untrained_model(request.init, request.seed, command.model_config)
        sources = [ModelSource(name=f"init-seed{request.seed}", step=0, model=model,
                               source_id=untrained_source_id(model_spec(model), request.seed))]
    else:
        sources = checkpoint_sources(request.checkpoint)
    if fabric is not None:
        with fabric.rank_zero_first(local=True):  # a tokenizer to train is trained once per node
            tokenizer, tok_hash = load_tokenizer_for(request, command.data_config)
    else:
        tokenizer, tok_hash = load_tokenizer_for(request, command.data_config)
    lines: list[int] = []  # the file's line number of each prompt, for errors naming the line
    if request.prompts:
        numbered, max_tokens = read_prompt_lines(request.prompts), request.tokens
        lines, texts = [number for number, _ in numbered], [text for _, text in numbered]
    else:
        texts = validation_prompts(request.num_prompts, **data_options(request, command.data_config))
        max_tokens = DEFAULT_STORY_TOKENS if request.tokens is None else request.tokens
    prompts: PromptSet = encode_prompts(texts, tokenizer, max_tokens=max_tokens)
    allowed = None
    if request.allowed_tokens is not None:
        allowed = sorted(set(tokenizer.encode(Path(request.allowed_tokens).read_text(encoding="utf-8"))))
    settings = dataclasses.replace(settings, allowed_tokens=allowed)
    first_model = sources[0].load(tok_hash)
    parse_blocks(request.blocks, first_model.n_blocks)  # fail before any work
    long = first_too_long(prompts, first_model.context_length)
    if long is not None:
        where = f"{request.prompts}:{lines[long]}: " if lines else f"validation story {long}: "
        raise ValueError(f"{where}prompt of {int(prompts.lengths[long])} tokens is longer than the model's context "
                         f"length {first_model.context_length}")
    if command.calibrate:
        lr = None
        if shard.is_main:  # one choice for every rank, even where devices round differently
            model = first_model if device is None else first_model.to(device)
            lr, scores = calibrate_lr(model, prompts.ids, settings=settings,
                                      pad_token_id=tokenizer.pad_token_id, prompt_lengths=prompts.lengths)
            print(f"calibrated lr {lr} (block-1 self recovery by lr: {scores})")
        settings = dataclasses.replace(settings, lr=shard.broadcast(lr))
    out = Path(request.out)
    plan = ProbePlan(blocks=request.blocks, masks=masks, contexts=contexts, settings=settings)
    sink = WandbRun(out, settings.as_record()) if command.wandb and shard.is_main else None
    try:
        outcome = probe_and_report(sources, prompts, tokenizer, plan, out,
                                   title=f"{first_model.family} ({request.checkpoint or request.init})",
                                   tokenizer_hash=tok_hash, shard=shard, device=device, sink=sink)
    finally:
        if sink is not None:
            sink.close()
    if not shard.is_main:
        return
    for s in outcome.summary:
        nonself = "" if s["nonself_acc"] is None else f" non-self {s['nonself_acc']:.2f}"
        print(f"step {s['step']:>6} {s['context']:>6} block {s['block']} m={s['mask']}: "
              f"self {s['self_acc']:.2f}{nonself} ratio {s['distance_ratio']:.2f}")
    print(f"report: {outcome.files['report']}")


def _names(spec: str | list[str]) -> list[str]:
    """'prompt,padded' or [prompt, padded] -> a list of names."""
    items = spec if isinstance(spec, list) else spec.split(",")
    return [item.strip() for item in items if item.strip()]
