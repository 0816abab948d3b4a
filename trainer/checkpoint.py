"""Checkpoints in the run directory, published atomically.

Why our own layout instead of Ray Train's checkpoint upload: the same trainer runs under
torchrun and `accelerate launch`, where Ray's API does not exist, and uploading would copy every
shard a second time. Every rank writes into `.staging-step_N/` (DeepSpeed state plus its own data
position and RNG), then rank 0 adds a manifest, renames the folder to `step_N` (one atomic step)
and rewrites the `latest` pointer atomically. A crash at any moment leaves the previous
checkpoint whole and `latest` pointing at it.

The manifest lists every file with its size and SHA-256 (`sha256sum` checks them by hand). Sizes are
checked whenever checkpoints are listed (cheap: a truncated shard is not a checkpoint); checksums are
checked by the ranks together before a resume (`verified_latest`), each reading its share, so a
shard damaged in place (bad disk, bad copy) makes the run resume from the previous checkpoint.

The published checkpoints live in the run's home folder (trainer.storage: the local folder itself, or
`output.dir: s3://…`), which is the truth when choosing one; ranks write into a local working copy.
After the local publish, each file is copied to the home by one rank that has it (nodes need not share a
disk), the manifest after all of them and `latest` last, so a crash mid-upload leaves the previous
checkpoint as `latest`. For a local run these copies are the folder itself and cost nothing. Before a
resume one rank per node fetches the checkpoint, unless that node's copy already matches its manifest.

A save has two parts (`stage`, then `publish`). Staging is DeepSpeed's own save into `.staging-step_N/`
plus each rank's state: collectives of the training process group, so it runs on the step path. Publishing
is everything after (listings, checksums, manifest, rename, upload, `latest`, retention): it may run in a
background thread while training goes on (trainer.async_checkpoint), then its collectives go through a
process group of their own, never the training group (trainer.checkpointing.Checkpointing says why). Every step of
a publication ends in an exchange of each rank's outcome, so a failure on one rank (a full disk, an object
store error) fails the publication on every rank at the same point instead of leaving the others waiting;
what it left is removed and `latest` keeps naming the checkpoint before.

This module is the store and its reading side; the writing side is trainer.checkpoint_publish (mixed into
CheckpointStore), the names both use trainer.checkpoint_layout, their collectives trainer.rank_exchange.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from trainer.checkpoint_layout import (
    DOWNLOAD_PREFIX,
    LATEST,
    MANIFEST,
    STAGING_PREFIX,
    UNIVERSAL,
    Checkpoint,
    CheckpointError,
    Staged,
    tag_for,
)
from trainer.checkpoint_listing import CheckpointListing
from trainer.checkpoint_publish import CheckpointPublishing
from trainer.rank_exchange import barrier, checksums, gathered
from trainer.safe_load import UnsafeCheckpointError, load_file
from trainer.storage import Folder

# The layout's names are the store's: callers import them from here.
__all__ = ["DOWNLOAD_PREFIX", "LATEST", "MANIFEST", "STAGING_PREFIX", "UNIVERSAL", "Checkpoint", "CheckpointError",
           "CheckpointStore", "Staged", "tag_for"]

log = logging.getLogger("zeroray.checkpoint")


class CheckpointStore(CheckpointListing, CheckpointPublishing):
    """The checkpoints of one run, as one of its `world_size` ranks sees them: `root` is this node's working
    folder, `home` where they are published (default: `root` itself)."""

    def __init__(self, root: Path, rank: int = 0, world_size: int = 1, home: Folder | None = None):
        super().__init__(root, home)
        self.rank = rank
        self.world_size = world_size
        self.last_bytes = 0  # the size of the last checkpoint this store published (all ranks' files)
        # Which ranks share a working copy: one download and one clean-up per copy. One folder every rank
        # sees counts as one host. Gathered here, where every rank constructs the store at the same point.
        self._hosts = (gathered(socket.gethostname(), world_size) if self.home.per_node_copies
                       else [None] * max(world_size, 1))

    @classmethod
    def of_run(cls, output, rank: int = 0, world_size: int = 1) -> CheckpointStore:
        """The store of a run's `output` section (trainer.storage.OutputConfig)."""
        return cls(Path(output.run_dir) / "checkpoints", rank, world_size, output.home.child("checkpoints"))

    @property
    def _host_leader(self) -> bool:
        """The rank that looks after its working copy (rank 0 when every rank shares one folder)."""
        return self._hosts.index(self._hosts[self.rank % len(self._hosts)]) == self.rank

    @property
    def _several_copies(self) -> bool:
        """Ranks on several nodes, each node with a working copy of its own."""
        return len(set(self._hosts)) > 1

    @staticmethod
    def _local_manifest(folder: Path) -> dict | None:
        """The manifest of a checkpoint folder in the working copy, when its files have their sizes."""
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            for rel, size in manifest["files"].items():
                if (folder / rel).stat().st_size != size:
                    return None
            return manifest
        except (OSError, ValueError, KeyError):
            return None

    def verified_latest(self) -> Checkpoint | None:
        """`latest()`, with every file's checksum checked against the manifest; a damaged checkpoint is
        reported and the one before it tried. Collective: call on every rank (each reads its share).
        The checkpoint is fetched into the working copy first (once per copy; nothing for a local run)."""
        candidates = self.published()
        chosen = self._latest_of(candidates)
        candidates = [c for c in candidates if chosen is not None and c.step <= chosen.step]
        while candidates:
            ckpt = candidates.pop()
            damaged = self._damaged(ckpt, fresh_copy=False)
            if damaged and self.home.per_node_copies:
                damaged = self._damaged(ckpt, fresh_copy=True)  # the node's copy may be the bad one
            if not damaged:
                return ckpt
            if self.rank == 0:
                log.warning("checkpoint %s/%s is damaged: %s do not match the checksums in its manifest; using %s "
                            "instead", self.home.url, ckpt.tag, ", ".join(damaged),
                            candidates[-1].tag if candidates else "none (starting from step 0)")
        return None

    def _damaged(self, ckpt: Checkpoint, fresh_copy: bool) -> list[str]:
        """Files of `ckpt` whose checksum does not match its manifest. Collective."""
        self._fetch(ckpt, force=fresh_copy)
        manifest = self._local_manifest(ckpt.path)
        if manifest is None:
            return [MANIFEST]  # a download cut short
        expected = manifest.get("sha256")
        if expected is None:  # written before manifests had checksums: sizes were checked
            return []
        actual = checksums(ckpt.path, sorted(expected), self.rank, self.world_size)
        return sorted(rel for rel, digest in expected.items() if actual.get(rel) != digest)

    def _fetch(self, ckpt: Checkpoint, force: bool) -> None:
        """Bring a published checkpoint into this node's working copy (one rank per copy), unless the copy
        there already has the same manifest and file sizes. Collective."""
        if self._host_leader:
            published = self.home.read_text(f"{ckpt.tag}/{MANIFEST}")
            local = ckpt.path / MANIFEST
            current = (local.is_file() and local.read_text() == published
                       and self._local_manifest(ckpt.path) is not None)
            if force or not current:
                partial = self.root / (DOWNLOAD_PREFIX + ckpt.tag)
                shutil.rmtree(partial, ignore_errors=True)
                self.home.get(ckpt.tag, partial)
                shutil.rmtree(ckpt.path, ignore_errors=True)
                os.replace(partial, ckpt.path)
        barrier(self.world_size)

    def local_copy(self, ckpt: Checkpoint) -> Checkpoint:
        """`ckpt` with its files in this machine's working copy (fetched when needed). One process."""
        self._fetch(ckpt, force=False)
        return ckpt

    def rank_state(self, ckpt: Checkpoint, rank: int | None = None) -> dict:
        """Data position and RNG of one rank (default: this one) as the checkpoint saved them."""
        rank = self.rank if rank is None else rank
        try:
            return load_file(ckpt.path / f"rank_{rank:05d}.pt")
        except UnsafeCheckpointError as exc:
            raise CheckpointError(str(exc)) from None

    def universal(self, ckpt: Checkpoint) -> Path:
        """The checkpoint in DeepSpeed's universal format (whole, unpartitioned optimizer state), which
        loads on any number of ranks. Rank 0 converts with DeepSpeed's own `ds_to_universal`, next to
        the published checkpoints (never inside one: a published folder is not changed); every rank
        waits for it. Nodes with working copies of their own get it through the home folder.
        Call on every rank."""
        out = self.root / UNIVERSAL / ckpt.tag
        if self.rank == 0 and not (out / "zero").is_dir():
            shutil.rmtree(out, ignore_errors=True)
            proc = subprocess.run(
                [sys.executable, "-m", "trainer.safe_load", "deepspeed.checkpoint.ds_to_universal",  # weights-only
                 "--input_folder", str(ckpt.path),
                 "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1",
                 # Adds the version record DeepSpeed expects a Megatron-style client to have saved.
                 "--inject_missing_state"],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                shutil.rmtree(out, ignore_errors=True)
                raise CheckpointError(
                    f"converting {ckpt.path} to DeepSpeed's universal format (to resume on another worker count) "
                    f"failed:\n{(proc.stdout + proc.stderr)[-2000:]}"
                )
            if self._several_copies:
                self.home.put(out, f"{UNIVERSAL}/{ckpt.tag}")
        barrier(self.world_size)
        if self._several_copies and self._host_leader and self._hosts[self.rank] != self._hosts[0]:
            shutil.rmtree(out, ignore_errors=True)
            self.home.get(f"{UNIVERSAL}/{ckpt.tag}", out)
        barrier(self.world_size)
        return out

    def remove_universal(self) -> None:
        """After every rank loaded the conversion. Call on every rank."""
        if self._host_leader:
            shutil.rmtree(self.root / UNIVERSAL, ignore_errors=True)
        if self.rank == 0 and self._several_copies:
            self.home.remove(UNIVERSAL)

