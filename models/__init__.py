"""Model families behind one registry: `models.build(config)`, `models.entry(name)`."""

from models import llama  # noqa: F401  (registers the family)
from models.output import ModelOutput
from models.registry import build, entry, names

__all__ = ["ModelOutput", "build", "entry", "names"]
