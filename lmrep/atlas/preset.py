"""What an atlas run measures: the preset dataclasses that `configs/atlas/*.yaml` map onto.

A preset names the prompts, the probe settings shared by every cell, the probe
protocols (each one reported on its own), the untrained sweeps, the trained
families with their token budget and checkpoint schedule, and the source's
claims with the rule that decides each. Every field can be overridden on the
command line (`--trained.max_steps 200`, `--prompts.stories 8`), like every
other lmrep config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lmrep.probe import ProbeSettings
from lmrep.prompts import PromptSet

DEVICES = ("auto", "cpu", "cuda")
SOURCE_PROMPT = "Mario, the Idea, versus Mario, the Man"  # the prompt the source inverted throughout


@dataclass
class DataSpec:
    """Where the stories come from, and where the tokenizer and tokenized data are cached."""

    source: str = "auto"
    """auto (the local folder when found, else the hub), local (data_dir or $LMREP_DATA_DIR) or hub."""
    data_dir: str | None = None
    """The local TinyStories folder (default: $LMREP_DATA_DIR, else ../shared/data/tinystories)."""
    cache_dir: str = ".cache/lmrep"
    """Tokenizer and tokenized-data cache, shared with train.py runs."""


@dataclass
class PromptSpec:
    """The prompt set: validation stories (never training text) cut to T tokens, plus the source's prompt."""

    stories: int = 32
    """Validation stories used as prompts."""
    tokens: int = 16
    """T: each prompt is cut to this many tokens."""
    extra: list[str] = field(default_factory=lambda: [SOURCE_PROMPT])
    """Prompts put first in the set (index 0 is the source's own prompt)."""


@dataclass
class Protocol:
    """One way of inverting a block; every cell of the atlas is measured under each protocol separately."""

    name: str
    """Short name, used in folder names, atlas.csv and plot labels."""
    label: str
    """What it is, in words (plot titles and the report)."""
    context: str = "prompt"
    """prompt or padded (ProbeSettings.context)."""
    free: str = "all"
    """all, real or masked (ProbeSettings.free)."""
    method: str = "embedding"
    """ProbeSettings.method; a method this lmrep does not have (e.g. exact) is reported as not available."""
    source: bool = False
    """True for the protocol the source itself used (padded, every position free)."""
    max_mask: int | None = None
    """The largest mask m this protocol measures (None: every mask of the stage). The exact solver is exhaustive
    up to m = 1; beyond, its coordinate search sweeps the vocabulary per masked position, the atlas's costliest
    cell, so a preset may stop it there."""
    max_d_model: int | None = None
    """The widest model this protocol measures (None: every width); the exact solver's cost grows with d^2."""
    prompts: int | None = None
    """Only the first N prompts (the source's prompt first; None: all): the exact solver costs a vocabulary sweep
    per prompt, where the gradient methods batch them."""

    def settings(self, base: ProbeSettings) -> ProbeSettings | None:
        """The probe settings of this protocol, or None where ProbeSettings does not accept them."""
        try:
            return dataclasses.replace(base, context=self.context, free=self.free, method=self.method)
        except ValueError:
            return None

    def prompt_set(self, prompts: PromptSet) -> PromptSet:
        """The prompts this protocol measures: the first `prompts` of the set, or all of it."""
        if self.prompts is None or self.prompts >= len(prompts):
            return prompts
        if self.prompts < 1:
            raise ValueError(f"protocol {self.name}: prompts must be >= 1, got {self.prompts}")
        n = self.prompts
        return PromptSet(ids=prompts.ids[:n], lengths=prompts.lengths[:n], texts=prompts.texts[:n])

    def measures(self, d_model: int) -> bool:
        """Whether this protocol measures a model of this width."""
        return self.max_d_model is None or d_model <= self.max_d_model

    def masks(self, masks: list[int]) -> list[int]:
        """The masks this protocol measures: those up to max_mask; free=masked optimises only positions < m, so
        m = 0 has nothing."""
        kept = [m for m in masks if self.max_mask is None or m <= self.max_mask]
        return [m for m in kept if m > 0] if self.free == "masked" else kept


@dataclass
class Sweep:
    """Untrained models of one architecture over widths, each initialised with several seeds."""

    name: str
    """Short name, e.g. flat-n8."""
    family: str = "mixer"
    """Model family (models.MODEL_FAMILIES)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Fixed fields of the family's config (mixing, expansion, n_blocks, context_length, ...)."""
    d_models: list[int] = field(default_factory=lambda: [64])
    """Widths d_model to build."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Initialisation seeds (the atlas averages over them)."""
    blocks: list[int | str] = field(default_factory=lambda: [1, "last"])
    """Blocks to invert: numbers, or 'last' for block n."""


@dataclass
class TrainedFamily:
    """One family trained from scratch: a training config of configs/ with fields of its model overridden."""

    name: str
    """Short name, e.g. flat."""
    config: str
    """The training config it starts from (configs/*.yaml): optimiser, data and trainer settings."""
    model: dict[str, Any] = field(default_factory=dict)
    """Model config fields set on top of d_model, n_blocks and context_length (e.g. n_heads)."""


@dataclass
class Schedule:
    """Checkpoints: step 0, log-spaced early steps 1, 2, 4, ... up to log_until, then every `every`, and last."""

    every: int = 250
    """Steps between checkpoints after the log-spaced ones."""
    log_until: int = 64
    """Powers of two up to this step are checkpointed too (0: none)."""

    def steps(self, max_steps: int) -> list[int]:
        """Every checkpointed step of a run of max_steps steps, in order."""
        if self.every < 1 or self.log_until < 0:
            raise ValueError(f"schedule needs every >= 1 and log_until >= 0, got {self.every}, {self.log_until}")
        steps = {0, max_steps} | set(range(self.every, max_steps + 1, self.every))
        power = 1
        while power <= min(self.log_until, max_steps):
            steps.add(power)
            power *= 2
        return sorted(steps)


@dataclass
class Training:
    """The trained families: same widths, depth, tokens, tokenizer, optimiser schedule and token budget."""

    families: list[TrainedFamily] = field(default_factory=list)
    """The families to train."""
    d_models: list[int] = field(default_factory=lambda: [256])
    """Widths; every family is trained at each."""
    n_blocks: int = 8
    """Depth of every family."""
    context_length: int = 128
    """Training context L (also the padded probe's length)."""
    batch_size: int = 16
    """Sequences per optimiser step."""
    max_steps: int = 1000
    """Optimiser steps (the token budget is max_steps x batch_size x context_length)."""
    lr: float = 0.002
    """Peak AdamW learning rate, the same for every family."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    val_every: int = 250
    """Steps between validation passes (the validation-loss curve)."""
    val_batches: int = 16
    """Validation batches per pass, and for the final validation loss."""
    seed: int = 0
    """Initialisation and data-order seed."""
    schedule: Schedule = field(default_factory=Schedule)
    """Which steps are checkpointed, and so probed."""
    blocks: list[int | str] = field(default_factory=lambda: [1, 2, 4, "last"])
    """Blocks to invert at every checkpoint."""
    masks: list[int] = field(default_factory=lambda: [0, 1, 3])
    """Masks to probe at every checkpoint."""
    prompts: int | None = None
    """Probe the checkpoints on the first N prompts only (None: all; the source's prompt is first). A trained
    family has a probe per checkpoint, the atlas's largest share of work on a small machine."""


@dataclass
class Claim:
    """A finding of the source, with the rule (lmrep.atlas.claims) that decides it from the atlas cells."""

    id: int
    """Number in the issue's list."""
    text: str
    """The claim, in the source's words as far as possible."""
    rule: dict[str, Any]
    """threshold / compare / all rule over atlas.csv cells (see lmrep.atlas.claims)."""
    protocols: list[str] | None = None
    """Protocols the rule is judged under (default: every protocol of the preset)."""


@dataclass
class AtlasPreset:
    """A whole atlas: prompts, protocols, untrained sweeps, trained families and the claims to judge."""

    name: str = "custom"
    """The preset's name (report title)."""
    description: str = ""
    """What the preset is for, and what was cut to fit its budget."""
    budget: str = ""
    """The wall-time budget it is sized for, in words."""
    device: str = "auto"
    """cpu, cuda or auto (cuda when available) for probing and training."""
    data: DataSpec = field(default_factory=DataSpec)
    """Stories and caches."""
    prompts: PromptSpec = field(default_factory=PromptSpec)
    """The prompt set."""
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    """Settings of every inversion (each protocol sets context, free and method)."""
    protocols: list[Protocol] = field(default_factory=list)
    """Protocols, each reported separately."""
    masks: list[int] = field(default_factory=lambda: [0, 1, 3, 10])
    """Masks of the untrained sweeps (those shorter than every prompt)."""
    untrained: list[Sweep] = field(default_factory=list)
    """Untrained sweeps (probe only)."""
    trained: Training = field(default_factory=Training)
    """Trained families."""
    claims: list[Claim] = field(default_factory=list)
    """The source's claims, each with its rule."""

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}: choose one of {', '.join(DEVICES)}")
        names = [p.name for p in self.protocols]
        if len(set(names)) != len(names):
            raise ValueError(f"protocol names must be unique, got {names}")
        for claim in self.claims:
            unknown = sorted(set(claim.protocols or []) - set(names))
            if unknown:
                raise ValueError(f"claim {claim.id} names unknown protocol(s) {', '.join(unknown)}")


def resolve_blocks(spec: list[int | str], n_blocks: int) -> list[int]:
    """[1, 'last'] -> [1, n]: block numbers in order, each once, checked against the model's depth."""
    blocks = []
    for item in spec:
        block = n_blocks if str(item).strip() == "last" else int(item)
        if not 0 <= block <= n_blocks:
            raise ValueError(f"block {item} out of range: the model has blocks 0..{n_blocks}")
        if block not in blocks:
            blocks.append(block)
    return sorted(blocks)
