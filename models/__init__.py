"""Model families behind one probing surface: the one registry, and building models from plain dicts.

`model_spec(model)` is a JSON-able dict that `build_model(**spec)` turns back
into the same architecture, so a checkpoint can rebuild its model. A new family
is a file with a `SurfaceModel` subclass, one entry in `MODEL_FAMILIES` (or a
`register_family` call for a family kept outside `models/`) and a YAML in `configs/`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from models.llama import LlamaLM, LlamaModelConfig, export_hf
from models.mixer import MaskedMixer, MixerConfig
from models.surface import ProbeSurface, SurfaceModel

# Family name -> class, keyed by each class's own `family` so the two can never disagree.
MODEL_FAMILIES: dict[str, type[SurfaceModel]] = {cls.family: cls for cls in (LlamaLM, MaskedMixer)}

__all__ = [
    "MODEL_FAMILIES",
    "LlamaLM",
    "LlamaModelConfig",
    "MaskedMixer",
    "MixerConfig",
    "ProbeSurface",
    "SurfaceModel",
    "build_model",
    "export_hf",
    "model_class",
    "model_spec",
    "register_family",
]


def register_family(cls: type[SurfaceModel]) -> type[SurfaceModel]:
    """Add a model family under its own `family` name (usable as a class decorator); returns the class."""
    if not (isinstance(cls, type) and issubclass(cls, SurfaceModel)):
        raise TypeError(f"{cls!r} is not a models.surface.SurfaceModel subclass")
    for name in ("family", "config_class", "probe_lr"):
        if not hasattr(cls, name):
            raise TypeError(f"model family {cls.__qualname__} sets no {name}")
    if not dataclasses.is_dataclass(cls.config_class):
        raise TypeError(f"{cls.__qualname__}.config_class must be a dataclass, got {cls.config_class!r}")
    taken = MODEL_FAMILIES.get(cls.family)
    if taken is not None and taken is not cls:
        raise ValueError(
            f"model family '{cls.family}' is already registered to {taken.__module__}.{taken.__qualname__}"
        )
    MODEL_FAMILIES[cls.family] = cls
    return cls


def model_class(class_path: str) -> type[SurfaceModel]:
    """The registered family class that a YAML `class_path` (e.g. 'models.mixer.MaskedMixer') names."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):  # ValueError: a bare name has no module to import
        raise ValueError(f"cannot import model class '{class_path}'") from None
    if cls not in MODEL_FAMILIES.values():
        raise ValueError(f"'{class_path}' is not a registered model family: registered are "
                         f"{', '.join(sorted(MODEL_FAMILIES))} (add one with models.register_family)")
    return cls


def build_model(family: str, config: dict[str, Any]) -> SurfaceModel:
    """Build a model of `family` from a dict of its config fields (missing fields take defaults)."""
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family '{family}': choose one of {', '.join(sorted(MODEL_FAMILIES))}")
    cls = MODEL_FAMILIES[family]
    valid = [field.name for field in dataclasses.fields(cls.config_class)]
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(unknown)} for model family '{family}': valid keys are {', '.join(valid)}"
        )
    return cls(cls.config_class(**config))


def model_spec(model: SurfaceModel) -> dict[str, Any]:
    """The family and config of a model as plain JSON-able types: `build_model(**spec)` rebuilds it."""
    return {"family": model.family, "config": dataclasses.asdict(model.config)}

