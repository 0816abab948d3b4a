"""Model families behind one registry: `models.build(config)`, `models.entry(name)`."""

from models import charformer, convbert, llama, widenet  # noqa: F401  (register the families)
from models.output import ModelOutput
from models.registry import build, entry, names

__all__ = ["ModelOutput", "build", "entry", "names"]
