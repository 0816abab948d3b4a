"""The `data` section of the run spec."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from data_pipelines.objectives import CausalObjective, Objective


class LayoutError(ValueError):
    """Workers, batch and logical streams that do not fit together; the message says what to change."""


# Suffixes dropped from a path's last component to name a source (data.tar.gz → data).
_NAME_SUFFIXES = {".parquet", ".jsonl", ".json", ".txt", ".md", ".arrow", ".gz", ".bz2", ".xz", ".zst", ".zstd"}


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(
        description="A local file, folder or glob; an fsspec URL (s3://…, memory://…); or a Hub dataset name."
    )
    name: str | None = Field(
        None,
        pattern=r"^[\w.-]+$",
        description="Name in metrics (`data/tokens/<name>`) and messages; default: the last path component "
        "without extension (globs skipped: `corpus/web/*.jsonl` → `web`).",
    )
    format: Literal["auto", "parquet", "json", "text", "arrow"] = Field(
        "auto", description="File format; auto = from the file extensions."
    )
    split: str = Field("train", description="Split to read from a Hub dataset.")
    weight: float = Field(1.0, gt=0, description="Relative sampling weight when several sources are mixed.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to fsspec for URL sources as they are: credentials, `endpoint_url`, and nested "
        "options such as s3fs's `client_kwargs: {region_name: …}` or `config_kwargs: {connect_timeout: 5, "
        "read_timeout: 30, retries: {max_attempts: 3}}`.",
    )

    @property
    def label(self) -> str:
        """`name`, or the one derived from the path: what metrics and messages call this source."""
        if self.name:
            return self.name
        parts = [p for p in PurePosixPath(self.path.split("://", 1)[-1]).parts if not re.search(r"[*?\[]", p)]
        last = PurePosixPath(parts[-1] if parts else "source")
        while last.suffix in _NAME_SUFFIXES:
            last = last.with_suffix("")
        return str(last) or "source"


class BadDataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal["skip", "fail"] = Field(
        "skip", description="skip: skip and count unusable records (within max_fraction); fail: the first one stops "
        "the run."
    )
    max_fraction: float = Field(
        0.01, ge=0, le=1, description="Largest share of unusable records a logical stream may read (policy skip)."
    )
    min_records: int = Field(
        200, ge=1, description="Records a logical stream reads before max_fraction is enforced (early noise)."
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
        0, ge=0, description="Seed of the data's random draws: source mixing, file order per epoch, the window "
        "shuffle and the objective's masks."
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
    bad_data: BadDataConfig = Field(
        default_factory=BadDataConfig,
        description="Unusable records (empty documents, malformed JSON, undecodable UTF-8, no text field, unreadable "
        "files): `{policy: skip|fail, max_fraction: 0.01, min_records: 200}`. Skipped and counted (metrics "
        "`data/bad/<kind>`); a logical stream whose share of them exceeds max_fraction, once it has read "
        "min_records records, stops the run naming its sources and counts.",
    )
    loader_workers: int = Field(
        1,
        ge=0,
        description="Processes per worker that read and tokenize (torch DataLoader workers; 0 = in the training "
        "process). Each takes whole logical streams, so it must divide the streams a worker reads "
        "(data.streams ÷ cluster.workers); the data order does not depend on it. Unset in a run spec whose "
        "workers have one CPU core each (cluster.cpus_per_worker: 1), it is 0: a loader process would only "
        "share the training process's core.",
    )
    shuffle_buffer: int = Field(
        0,
        ge=0,
        description="Windows held per logical stream and emitted in a seeded random order (0 = off). Its contents "
        "are saved with the data state, so a resume continues exactly; memory and checkpoints grow by "
        "shuffle_buffer × (seq_len + 1) tokens per stream.",
    )
    document_mask: bool = Field(
        False,
        description="Causal objective only: batches carry `segment_ids` and the model attends only within each "
        "packed document (block-diagonal causal mask).",
    )

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.document_mask and self.objective.kind != "causal":
            raise ValueError(
                f"data.document_mask applies to the causal objective only (data.objective.kind is "
                f"{self.objective.kind!r}: its windows are not predicted left to right); remove data.document_mask"
            )
        labels = [s.label for s in self.sources]
        doubled = sorted({n for n in labels if labels.count(n) > 1})
        if doubled:
            raise ValueError(
                f"data.sources: several sources are named {', '.join(map(repr, doubled))} (metrics and messages "
                f"name sources); give each a distinct `name:`"
            )
        return self

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
        owned = self.streams // workers
        if self.loader_workers and owned % self.loader_workers:
            fits = [d for d in range(1, owned + 1) if owned % d == 0]
            raise LayoutError(
                f"data.loader_workers ({self.loader_workers}) must divide the logical streams each worker reads "
                f"(data.streams {self.streams} ÷ {workers} worker(s) = {owned}): loader workers are dealt whole "
                f"streams, as workers are. Set data.loader_workers to one of 0, {', '.join(map(str, fits))} "
                f"(0 = read in the training process)"
            )
