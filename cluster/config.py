"""The `cluster` section of the run spec: where the workers run and with what."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Above the largest clusters trained on; a bound, so that a typo (an extra zero, or twenty) is named here
# instead of making the elastic-batch check walk a range of 10^20 counts.
MAX_WORKERS = 1_000_000


class ClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    workers: int | tuple[int, int] = Field(
        2,
        description="Training processes (data-parallel ranks). [min, max] = elastic: Ray Train starts as many as "
        "the cluster holds (up to max), continues on fewer when nodes are lost (down to min) and grows back when "
        "they return, each time from the latest checkpoint; needs trainer.global_batch_size.",
    )
    cpus_per_worker: int = Field(1, ge=1, description="CPU cores reserved for, and threads used by, each worker.")
    gpus_per_worker: int = Field(0, ge=0, le=1, description="GPUs per worker (0 = CPU training with gloo).")
    resources_per_worker: dict[str, float] = Field(
        {}, description="Custom Ray resources each worker reserves besides CPUs and GPUs, e.g. {trainer_slot: 1} "
        "(nodes offer them through `ray start --resources`)."
    )
    placement: Literal["pack", "spread"] = Field(
        "pack", description="pack = fill a node before using the next (fast collectives); spread = one worker per "
        "node where possible (a lost node takes fewer workers with it). Ray's PACK/SPREAD placement strategies."
    )
    resize_check_s: float = Field(
        60.0, gt=0, description="Elastic runs: seconds between Ray Train's checks for more room while training runs; "
        "growing restarts the workers from the latest checkpoint."
    )
    address: str | None = Field(
        None, description="Ray cluster to join (ray://…, host:port, 'auto'); null = start an embedded local cluster."
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _count_or_range(cls, value):
        """One clear message instead of pydantic's one per member of the union."""
        def is_count(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        if is_count(value):
            low = high = value
        elif isinstance(value, list | tuple) and len(value) == 2 and all(map(is_count, value)):
            low, high = value
        else:
            raise ValueError(f"{value!r} is neither a worker count ≥ 1 (e.g. 2) nor a range [min, max] of them "
                             f"(e.g. [1, 4])")
        if high > MAX_WORKERS:
            raise ValueError(f"{high} workers: at most {MAX_WORKERS:,} (a typo?)")
        if low > high:
            raise ValueError(f"[{low}, {high}]: the minimum must not exceed the maximum; write [{high}, {low}]")
        return low if low == high else (low, high)  # [n, n] is simply n workers

    @model_validator(mode="after")
    def _resources_positive(self) -> ClusterConfig:
        if any(v <= 0 for v in self.resources_per_worker.values()):
            raise ValueError(f"cluster.resources_per_worker {self.resources_per_worker}: amounts must be positive")
        return self

    @property
    def elastic(self) -> bool:
        return isinstance(self.workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.workers[0] if isinstance(self.workers, tuple) else self.workers

    @property
    def max_workers(self) -> int:
        return self.workers[1] if isinstance(self.workers, tuple) else self.workers

    @property
    def ray_resources_per_worker(self) -> dict[str, float]:
        """What Ray reserves for each worker: CPUs, GPUs and the custom resources."""
        gpus = {"GPU": self.gpus_per_worker} if self.gpus_per_worker else {}
        return {"CPU": self.cpus_per_worker, **gpus, **self.resources_per_worker}
