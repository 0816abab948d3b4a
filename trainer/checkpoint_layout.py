"""The names and types of a checkpoint's layout, shared by the reading side (trainer.checkpoint) and
the writing side (trainer.checkpoint_publish)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STAGING_PREFIX = ".staging-"
DOWNLOAD_PREFIX = ".download-"
LATEST = "latest"
MANIFEST = "manifest.json"
UNIVERSAL = "universal"  # conversions for a resume on another worker count


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which and why."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    world_size: int

    @property
    def tag(self) -> str:
        return self.path.name


@dataclass
class Staged:
    """A checkpoint written to local staging on every rank, not yet published."""

    step: int
    stage_dir: Path
    staged_s: float  # how long staging took on this rank (the part on the step path)

    @property
    def tag(self) -> str:
        return tag_for(self.step)

