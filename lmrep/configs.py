"""Training configs as files: a family YAML holds only what differs from `base.yaml` beside it.

`train.py fit --config configs/base.yaml --config configs/mixer_flat.yaml` composes them in
LightningCLI (later files override earlier ones, nested sections merge, lists are replaced).
Code that reads a family YAML itself (`probe.py --init`, the atlas, the tests) composes it the
same way here, so a family file never has to repeat the shared trainer and callbacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

BASE_CONFIG = "base.yaml"  # the shared part, in the same folder as the family files
# A file with this section is complete on its own (quickstart.yaml, a test's tiny config).
SELF_CONTAINED_KEY = "trainer"


def config_chain(path: str | Path) -> list[Path]:
    """The files that make up a training config, base first: the file alone when it has a trainer section."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    base = path.parent / BASE_CONFIG
    if path.name == BASE_CONFIG or not base.is_file() or SELF_CONTAINED_KEY in (_read(path) or {}):
        return [path]
    return [base, path]


def config_args(path: str | Path) -> list[str]:
    """The `--config` arguments that give LightningCLI the whole training config of `path`."""
    return [arg for file in config_chain(path) for arg in ("--config", str(file))]


def read_config(path: str | Path) -> dict[str, Any]:
    """The training config of `path` as one dict, composed as LightningCLI composes its --config files."""
    merged: dict[str, Any] = {}
    for file in config_chain(path):
        merged = merge(merged, _read(file) or {})
    return merged


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: nested dicts merge key by key, every other value (lists too) is replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
