"""Model registry: a name in the run spec → the model's config class and its module class.

Every model family registers itself here when `models` is imported, so the spec validator can
check `model.name` and the model's own keys before anything starts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from pydantic import BaseModel


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config_cls: type[BaseModel]
    model_ref: type[torch.nn.Module] | str
    """The module class, or "package.module:Class" for a family whose module is costly to import
    (transformers-based ones): validating a spec needs only the config class."""
    summary: str

    @property
    def model_cls(self) -> type[torch.nn.Module]:
        if not isinstance(self.model_ref, str):
            return self.model_ref
        module, _, attr = self.model_ref.partition(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, ModelEntry] = {}


def register(name: str, config_cls: type[BaseModel], model_cls: type[torch.nn.Module] | str, summary: str) -> None:
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
