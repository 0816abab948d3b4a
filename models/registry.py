"""Model registry: a name in the run spec → the model's config class and its module class.

Every model family registers itself here when `models` is imported, so the spec validator can
check `model.name` and the model's own keys before anything starts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from models.family import FamilyConfig, ModelFamily


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config_cls: type[FamilyConfig]
    model_ref: type[ModelFamily] | str
    """The module class, or "package.module:Class" for a family whose module is costly to import
    (transformers-based ones): validating a spec needs only the config class."""
    summary: str

    @property
    def model_cls(self) -> type[ModelFamily]:
        if not isinstance(self.model_ref, str):
            return self.model_ref
        module, _, attr = self.model_ref.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        if not issubclass(cls, ModelFamily):
            raise TypeError(f"model {self.name!r}: {self.model_ref} is not a models.family.ModelFamily")
        return cls


_REGISTRY: dict[str, ModelEntry] = {}


def register(name: str, config_cls: type[FamilyConfig], model_cls: type[ModelFamily] | str, summary: str) -> None:
    """Add a family (models/family.py has the checklist). A module class given as "package.module:Class"
    is imported on first use."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    if not issubclass(config_cls, FamilyConfig):
        raise TypeError(f"model {name!r}: {config_cls.__name__} must derive models.family.FamilyConfig")
    if not isinstance(model_cls, str) and not issubclass(model_cls, ModelFamily):
        raise TypeError(f"model {name!r}: {model_cls.__name__} must derive models.family.ModelFamily")
    _REGISTRY[name] = ModelEntry(name, config_cls, model_cls, summary)


def names() -> list[str]:
    return sorted(_REGISTRY)


def entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(names())}") from None


def build(config: FamilyConfig) -> ModelFamily:
    """Instantiate the module for a validated model config (its `name` field picks the family)."""
    return entry(config.name).model_cls(config)
