"""The `data` section of the run spec."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from data_pipelines.objectives import CausalObjective, Objective


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(
        description="A local file, folder or glob; an fsspec URL (s3://…, memory://…); or a Hub dataset name."
    )
    format: Literal["auto", "parquet", "json", "text", "arrow"] = Field(
        "auto", description="File format; auto = from the file extensions."
    )
    split: str = Field("train", description="Split to read from a Hub dataset.")
    weight: float = Field(1.0, gt=0, description="Relative sampling weight when several sources are mixed.")
    storage_options: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Passed to fsspec for URL sources (credentials, endpoint_url, …)."
    )


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: tuple[SourceConfig, ...] = Field(min_length=1, description="Where the training text comes from.")
    text_field: str = Field("text", description="Column that holds each document's text.")
    tokenizer: str = Field(
        "bytes", description="'bytes' (UTF-8 bytes, no training needed) or a path to a `tokenizers` JSON file."
    )
    seq_len: int = Field(256, ge=8, description="Tokens per training sequence (documents are packed).")
    tokenize_batch: int = Field(
        16, ge=1, description="Documents tokenized per call; small keeps the first step fast, large amortises."
    )
    objective: Objective = Field(
        default_factory=CausalObjective,
        description="What the model learns: `{kind: causal}`, `{kind: mlm, mask_prob}` or "
        "`{kind: span_corruption, noise_density, mean_span_length}`; the model must support it.",
    )
    seed: int = Field(0, description="Seed of the data's random draws: source mixing and the objective's masks.")

    @property
    def special_tokens(self) -> int:
        """Ids the objective appends after the tokenizer's vocabulary (pad, mask, sentinels)."""
        return self.objective.special_tokens(self.seq_len)
