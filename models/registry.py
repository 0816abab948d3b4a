"""Model registry: a name in the run spec → the model's config class and its module class.

Every model family registers itself here when `models` is imported, so the spec validator can
check `model.name` and the model's own keys before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config_cls: type[BaseModel]
    model_cls: type[torch.nn.Module]
    summary: str


_REGISTRY: dict[str, ModelEntry] = {}


def register(name: str, config_cls: type[BaseModel], model_cls: type[torch.nn.Module], summary: str) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = ModelEntry(name, config_cls, model_cls, summary)


def names() -> list[str]:
    return sorted(_REGISTRY)


def entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(names())}") from None


def build(config: BaseModel) -> torch.nn.Module:
    """Instantiate the module for a validated model config (its `name` field picks the family)."""
    return entry(config.name).model_cls(config)
