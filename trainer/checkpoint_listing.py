"""Which checkpoints a run's home folder holds and which one is `latest`: reading only.

Apart from the store (trainer.checkpoint), which also saves, loads and exchanges among ranks and so needs
torch: the driver lists a run's checkpoints before any worker starts, and `zeroray runs`, `zeroray plot` and
the experiments' summaries list them without training anything.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from trainer.checkpoint_layout import LATEST, MANIFEST, Checkpoint
from trainer.storage import Folder, LocalFolder

log = logging.getLogger("zeroray.checkpoint")


class CheckpointListing:
    """The published checkpoints of one run: `root` is this node's working folder, `home` where they are
    published (default: `root` itself)."""

    def __init__(self, root: Path, home: Folder | None = None):
        self.root = Path(root)
        self.home = home if home is not None else LocalFolder(self.root)

    def published(self) -> list[Checkpoint]:
        """Complete checkpoints in the home folder, oldest first (a folder without a valid manifest is not one)."""
        found = []
        for tag in self.home.folders("step_"):
            manifest = self._published_manifest(tag)
            if manifest is not None:
                found.append(Checkpoint(self.root / tag, manifest["step"], manifest["world_size"]))
        return found

    def _published_manifest(self, tag: str) -> dict | None:
        """The manifest of `tag` in the home folder, when every file it lists is there with its size."""
        try:
            manifest = json.loads(self.home.read_text(f"{tag}/{MANIFEST}") or "")
            sizes = self.home.sizes(tag)
            if any(sizes.get(rel) != size for rel, size in manifest["files"].items()):
                return None
            return manifest
        except (OSError, ValueError, KeyError):
            return None

    def latest(self) -> Checkpoint | None:
        return self._latest_of(self.published())

    def _latest_of(self, published: list[Checkpoint]) -> Checkpoint | None:
        tag = self.home.read_text(LATEST)
        tag = None if tag is None else tag.strip()
        for ckpt in published:
            if ckpt.tag == tag:
                return ckpt
        # The pointer is missing or names a damaged checkpoint: fall back to the newest whole one.
        fallback = published[-1] if published else None
        if tag is not None:
            log.warning("checkpoint %s named by %s/%s is incomplete or damaged; using %s instead", tag,
                        self.home.url, LATEST, fallback.tag if fallback else "none (starting from step 0)")
        return fallback
