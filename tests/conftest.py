"""Shared test set-up: W&B offline and quiet, tiny training runs through the real CLI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmrep.configs import read_config

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")

REPO = Path(__file__).resolve().parents[1]
# Short names for tiny_config's base YAML. Not a list of families to cover: the causality and YAML tests
# read every file in configs/ themselves, so a new family needs only its YAML there.
FAMILY_CONFIGS = {"llama": "llama.yaml", "flat": "mixer_flat.yaml", "expanded": "mixer_expanded.yaml",
                  "parallel": "mixer_parallel.yaml"}


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenizer and tokenized-data cache for the whole test session."""
    return tmp_path_factory.mktemp("lmrep-cache")


def tiny_config(path: Path, family: str, run_dir: Path, cache: Path, *, steps: int, every: int,
                val_every: int | None = None, d: int = 32, blocks: int = 2, context: int = 32,
                batch_size: int = 8, callbacks: list[dict[str, Any]] | None = None) -> Path:
    """Write a short, quiet, self-contained training config derived from a family's YAML in configs/."""
    cfg = read_config(REPO / "configs" / FAMILY_CONFIGS[family])
    model = cfg["model"]["model"]["init_args"]["config"]
    model.update(d_model=d, n_blocks=blocks, context_length=context)
    if family == "llama":
        model["n_heads"] = 2
    cfg["run_dir"] = str(run_dir)
    cfg["model"]["warmup_steps"] = 2
    cfg["data"].update(cache_dir=str(cache), batch_size=batch_size)
    trainer = cfg["trainer"]
    trainer.update(max_steps=steps, val_check_interval=val_every or steps, limit_val_batches=2,
                   log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False)
    kept = [c for c in trainer["callbacks"] if not c["class_path"].endswith("SampleGenerations")]
    for c in kept:
        if c["class_path"].endswith("StepCheckpoint"):
            c["init_args"] = {"schedule": {"every": every}}
    trainer["callbacks"] = kept + (callbacks or [])
    path.write_text(yaml.safe_dump(cfg))
    return path
