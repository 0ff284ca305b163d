"""Model families behind one probing surface, and building them from plain dicts.

`model_spec(model)` is a JSON-able dict that `build_model(**spec)` turns back
into the same architecture, so a checkpoint can rebuild its model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from models.llama import LlamaLM, LlamaModelConfig, export_hf
from models.mixer import MaskedMixer, MixerConfig
from models.surface import ProbeSurface

MODEL_FAMILIES: dict[str, type[nn.Module]] = {
    "llama": LlamaLM,
    "mixer": MaskedMixer,
}

__all__ = [
    "MODEL_FAMILIES",
    "LlamaLM",
    "LlamaModelConfig",
    "MaskedMixer",
    "MixerConfig",
    "ProbeSurface",
    "build_model",
    "export_hf",
    "model_spec",
]


def build_model(family: str, config: dict[str, Any]) -> nn.Module:
    """Build a model of `family` from a dict of its config fields (missing fields take defaults)."""
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family '{family}': choose one of {', '.join(sorted(MODEL_FAMILIES))}")
    model_class = MODEL_FAMILIES[family]
    valid = [field.name for field in dataclasses.fields(model_class.config_class)]
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(unknown)} for model family '{family}': valid keys are {', '.join(valid)}"
        )
    return model_class(model_class.config_class(**config))


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The family and config of a model as plain JSON-able types: `build_model(**spec)` rebuilds it."""
    return {"family": model.family, "config": dataclasses.asdict(model.config)}


def model_class(class_path: str) -> type[nn.Module]:
    """The registered family class a YAML `class_path` names (e.g. models.mixer.MaskedMixer)."""
    for cls in MODEL_FAMILIES.values():
        if f"{cls.__module__}.{cls.__qualname__}" == class_path:
            return cls
    raise ValueError(f"unknown model class {class_path!r}: choose one of "
                     + ", ".join(f"{c.__module__}.{c.__qualname__}" for c in MODEL_FAMILIES.values()))
