"""Model families behind one registry: `models.build(config)`, `models.entry(name)`."""

# convbert_config, not convbert: the transformers-based networks load when one is built.
from models import charformer, convbert_config, llama, widenet  # noqa: F401  (register the families)
from models.output import ModelOutput
from models.registry import build, entry, names

__all__ = ["ModelOutput", "build", "entry", "names"]
