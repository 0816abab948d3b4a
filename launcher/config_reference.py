"""Generate docs/configuration.md from the spec classes, so the reference cannot drift.

`python -m launcher.config_reference > docs/configuration.md`; a test checks the committed file.
"""

from __future__ import annotations

import re
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

import models
from cluster.config import ClusterConfig
from data_pipelines.config import DataConfig, SourceConfig
from data_pipelines.objectives import CausalObjective, MLMObjective, SpanCorruptionObjective
from models.layers.moe import MoEConfig
from trainer.config import DebugConfig, TrainerConfig
from trainer.evaluation import EvalConfig
from trainer.spec import OutputConfig


def _type_name(annotation) -> str:
    text = repr(annotation) if typing.get_origin(annotation) else getattr(annotation, "__name__", repr(annotation))
    text = re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", text)  # data_pipelines.config.SourceConfig → SourceConfig
    return text.replace("NoneType", "None")


def _default(field) -> str:
    if field.default is PydanticUndefined:
        return "required" if field.default_factory is None else f"`{field.default_factory()!r}`"
    return f"`{field.default!r}`"


def section_table(title: str, cls: type[BaseModel], intro: str = "") -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|")
        type_name = _type_name(field.annotation).replace("|", "\\|")
        rows.append(f"| `{name}` | `{type_name}` | {_default(field)} | {meaning} |")
    return f"## {title}\n\n{intro}{chr(10) if intro else ''}" + "\n".join(rows) + "\n"


def render() -> str:
    parts = [
        "# Configuration reference\n",
        "Generated from the spec classes by `python -m launcher.config_reference`; do not edit by hand.\n"
        "A run spec is a YAML file with the sections below; any key can be overridden on the command line "
        "as `section.key=value` (values are read as YAML).\n",
    ]
    for name in models.names():
        entry = models.entry(name)
        parts.append(section_table(f"model (name: {name})", entry.config_cls, f"{entry.summary}.\n"))
    parts.append(section_table("model.moe", MoEConfig, "Optional mixture-of-experts MLPs, for `llama` and `hc_llm`.\n"))
    parts.append(section_table("data", DataConfig))
    parts.append(section_table("data.sources[]", SourceConfig))
    for objective in (CausalObjective, MLMObjective, SpanCorruptionObjective):
        kind = objective.model_fields["kind"].default
        parts.append(section_table(f"data.objective (kind: {kind})", objective))
    parts.append(section_table("trainer", TrainerConfig))
    parts.append(section_table("cluster", ClusterConfig))
    parts.append(section_table("eval", EvalConfig, "Loss on held-out data, in the metrics records as `eval/loss` and "
                               "`eval/perplexity`.\n"))
    parts.append(section_table("output", OutputConfig))
    parts.append(section_table("debug", DebugConfig, "Failure injection for zeroray's own tests (docs/fault_tolerance.md); never set in a real run.\n"))
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
