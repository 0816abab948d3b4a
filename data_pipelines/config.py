"""The `data` section of the run spec."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from data_pipelines.objectives import CausalObjective, Objective


class LayoutError(ValueError):
    """Workers, batch and logical streams that do not fit together; the message says what to change."""


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
    seed: int = Field(
        0, ge=0, description="Seed of the data's random draws: source mixing and the objective's masks."
    )
    streams: int = Field(
        8,
        ge=1,
        description="Logical data streams, fixed for the life of a run: stream i reads shard subset i of every "
        "source, and each optimizer step takes the same number of windows from every stream, so the data order "
        "does not depend on the number of workers (a run can resume on another worker count). Every source's "
        "shard (file) count must be a multiple of it; it must be a multiple of cluster.workers and divide the "
        "global batch (rows per optimizer step).",
    )

    @property
    def special_tokens(self) -> int:
        """Ids the objective appends after the tokenizer's vocabulary (pad, mask, sentinels)."""
        return self.objective.special_tokens(self.seq_len)

    def check_layout(self, global_batch: int, workers: int) -> None:
        """Raise LayoutError unless `workers` ranks can share the streams and every optimizer step of
        `global_batch` rows takes the same whole number of windows from each stream. Both conditions
        are what make the set of rows in a step independent of the worker count."""
        if global_batch % self.streams:
            divisors = [d for d in range(1, global_batch + 1) if global_batch % d == 0 and d % workers == 0]
            raise LayoutError(
                f"data.streams ({self.streams}) must divide the global batch ({global_batch} rows per optimizer "
                f"step = trainer.micro_batch_size × trainer.grad_accum_steps × cluster.workers): every step "
                f"takes the same number of windows from each logical stream. Change the batch to a multiple of "
                f"{self.streams}, or (for a new run: it changes the data order) set data.streams to one of "
                f"{', '.join(map(str, divisors))}"
            )
        if self.streams % workers:
            raise LayoutError(
                f"data.streams ({self.streams}) must be a multiple of the worker count ({workers}): each worker "
                f"reads whole logical streams, so at most {self.streams} workers and only counts that divide "
                f"{self.streams}. Use a worker count that divides {self.streams}, or (for a new run: it changes "
                f"the data order) set data.streams to a multiple of {workers}"
            )
