"""The `cluster` section of the run spec: where the workers run and with what."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    workers: int = Field(2, ge=1, description="Training processes (data-parallel ranks).")
    cpus_per_worker: int = Field(1, ge=1, description="CPU cores reserved for, and threads used by, each worker.")
    gpus_per_worker: int = Field(0, ge=0, le=1, description="GPUs per worker (0 = CPU training with gloo).")
    address: str | None = Field(
        None, description="Ray cluster to join (ray://…, host:port, 'auto'); null = start an embedded local cluster."
    )
