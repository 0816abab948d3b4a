"""The run spec's `output` section: where the run directory lives and what is sent where."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from trainer.storage.folder import Folder, LocalFolder, RemoteFolder, check_url, is_url


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dir: str = Field(
        "runs",
        description="Folder that holds run directories: a local folder, or an fsspec URL (s3://bucket/runs, gs://…) "
        "with output.storage_options; then every process works in a local copy (output.cache_dir) and "
        "checkpoints, metrics, logs and the spec are copied there.",
    )
    name: str | None = Field(None, description="Run name (its folder under dir); default: the config file's name.")
    keep_last: int = Field(3, ge=1, description="Checkpoints kept; older ones are deleted after a new one lands.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for a URL output.dir, as they are (e.g. endpoint_url, client_kwargs); empty: "
        "the provider's own environment variables and credential files. They are saved with the run's spec "
        "(spec.yaml, on the bucket too): keep secrets in the environment, not here.",
    )
    cache_dir: str = Field(
        "~/.cache/zeroray/runs",
        description="With a URL output.dir: the local folder, on every node, holding the working copy of the run "
        "directory (checkpoints are written here first, then uploaded; downloaded here to resume).",
    )
    trackers: tuple[Literal["tensorboard", "wandb", "mlflow"], ...] = Field(
        ("tensorboard",),
        description="Where the driver sends the metrics records besides metrics.jsonl: tensorboard (event files "
        "in `RUN_DIR/tensorboard`), wandb (an offline run in `RUN_DIR/wandb` unless $WANDB_MODE says otherwise; "
        "`wandb sync` uploads it), mlflow (output.mlflow_uri). A tracker that fails logs a warning; training "
        "goes on.",
    )
    project: str | None = Field(
        None,
        description="W&B project and MLflow experiment of the run; default $WANDB_PROJECT (W&B) or "
        "$MLFLOW_EXPERIMENT_NAME (MLflow), else 'zeroray'. The tracker run is named after the run directory; "
        "W&B reads its entity from $WANDB_ENTITY.",
    )
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI (a server, or sqlite:///…); default `file:RUN_DIR/mlruns`."
    )

    @field_validator("dir")
    @classmethod
    def _storage_exists(cls, value: str) -> str:
        if is_url(value):
            check_url(value)
        return value

    @property
    def remote(self) -> RemoteFolder | None:
        """The run directory on remote storage, or None for a local (or shared) folder."""
        if not is_url(self.dir):
            return None
        return RemoteFolder(f"{self.dir.rstrip('/')}/{self.name or 'run'}", dict(self.storage_options))

    @property
    def home(self) -> Folder:
        """Where the run directory lives: its remote folder, or the local folder every process works in."""
        return self.remote or LocalFolder(self.run_dir)

    @property
    def run_dir(self) -> Path:
        """The run directory every process reads and writes: the folder itself, or its local working copy."""
        if not is_url(self.dir):
            return Path(self.dir) / (self.name or "run")
        protocol, path = self.dir.split("://", 1)
        return Path(self.cache_dir).expanduser() / protocol / path.strip("/") / (self.name or "run")

    @property
    def location(self) -> str:
        """Where the run lives, for messages and job metadata: the URL, or the local folder."""
        remote = self.remote
        return remote.url if remote is not None else str(self.run_dir)
