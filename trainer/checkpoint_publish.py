"""The writing side of the checkpoint store (trainer.checkpoint says the layout and its guarantees): stage
on the step path, then publish (manifest, rename, copies to the home folder, `latest`, retention), and
undo what a failed publication left."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch

from trainer.checkpoint_layout import (
    DOWNLOAD_PREFIX,
    LATEST,
    MANIFEST,
    STAGING_PREFIX,
    Checkpoint,
    CheckpointError,
    Staged,
    tag_for,
)
from trainer.rank_exchange import each, file_owners
from trainer.storage import fsync_tree, sha256

log = logging.getLogger("zeroray.checkpoint")

# What deepspeed.runtime.engine.DeepSpeedEngine._copy_recovery_script writes into the save folder (0.19.8).
DEEPSPEED_RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


class CheckpointPublishing:
    """Mixed into trainer.checkpoint.CheckpointStore, whose attributes it uses (`root`, `home`, `rank`,
    `world_size`, `_host_leader`, `published`)."""

    def remove_staging(self) -> None:
        """Before training, once per working copy: drop folders that a crash left half-written."""
        if not self._host_leader:
            return
        for prefix in (STAGING_PREFIX, DOWNLOAD_PREFIX):
            for d in self.root.glob(prefix + "*"):
                shutil.rmtree(d, ignore_errors=True)

    def save(self, engine, step: int, rank_state: dict, run_files: dict[str, str], keep_last: int) -> Checkpoint:
        """Collective: every rank calls it. `rank_state` is this rank's own (data position, RNG);
        `run_files` are small text files rank 0 adds (the spec, the trainer state). Stage, then publish,
        before returning."""
        return self.publish(self.stage(engine, step, rank_state, run_files), keep_last)

    def free_space_error(self, needed: int) -> str | None:
        """Why the working copy lacks room for a checkpoint of `needed` bytes (None: it has room). Local."""
        where = next(d for d in (self.root, *self.root.parents) if d.exists())
        free = shutil.disk_usage(where).free
        if free >= needed:
            return None
        return (f"{free / 2**20:.0f} MiB free in {self.root} on {socket.gethostname()}, the last checkpoint took "
                f"{needed / 2**20:.0f} MiB")

    def stage(self, engine, step: int, rank_state: dict, run_files: dict[str, str]) -> Staged:
        """The part of a save on the step path: DeepSpeed's state and this rank's own into local staging.
        Collective on the training process group (DeepSpeed's save is): every rank calls it."""
        started = time.perf_counter()
        tag = tag_for(step)
        stage_dir = self.root / (STAGING_PREFIX + tag)
        self.root.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            self.home.remove(tag)  # a damaged or older copy of this step: no stale files under a new manifest
        engine.save_checkpoint(str(self.root), tag=stage_dir.name, save_latest=False)
        torch.save(rank_state, stage_dir / f"rank_{self.rank:05d}.pt")
        if self.rank == 0:
            # DeepSpeed's rank 0 copies its recovery scripts beside the checkpoints at every ZeRO save: code
            # meant to be run by hand, which unpickles with weights_only=False, in a folder others may write.
            # `zeroray export` does their job with weights-only loads; the run directory holds no code.
            for script in DEEPSPEED_RECOVERY_SCRIPTS:
                (self.root / script).unlink(missing_ok=True)
            for name, text in run_files.items():
                (stage_dir / name).write_text(text)
        return Staged(step, stage_dir, time.perf_counter() - started)

    def publish(self, staged: Staged, keep_last: int, group=None,
                before_manifest: Callable[[Staged], None] | None = None) -> Checkpoint:
        """Publish a staged checkpoint: manifest, rename, copies to the home folder, `latest`, retention.
        Collective on `group` (every rank calls it with its own `staged` of the same step). Raises the same
        CheckpointError on every rank when any rank fails, after removing what the attempt left (`latest`
        still names the checkpoint before)."""
        try:
            return self._publish_staged(staged, keep_last, group, before_manifest)
        except CheckpointError:
            self._discard(staged)
            raise

    def _publish_staged(self, staged: Staged, keep_last: int, group, before_manifest) -> Checkpoint:
        tag, stage_dir, final, n = staged.tag, staged.stage_dir, self.root / staged.tag, self.world_size
        each("staging", lambda: None, n, group)  # every rank's files are written before any rank lists them
        manifest = self._manifest(stage_dir, staged.step, group)

        def local_publish() -> None:  # in the working copy: one rename
            if self._host_leader:
                if self.rank == 0:
                    fsync_tree(stage_dir)
                    (stage_dir / MANIFEST).write_text(manifest["text"])
                shutil.rmtree(final, ignore_errors=True)  # a re-run of the same step after a crash: replace it
                os.replace(stage_dir, final)

        each("publishing in the working copy", local_publish, n, group)

        def upload() -> None:  # to the home folder: each file by its owner (for a local run, no-ops)
            for rel in manifest["mine"]:
                self.home.put(final / rel, f"{tag}/{rel}")
            if before_manifest is not None:
                before_manifest(staged)

        each("copying the files to the home folder", upload, n, group)  # all in place before the manifest

        def commit() -> None:  # the manifest says the checkpoint exists, `latest` that it is the one
            if self.rank == 0:
                self.home.write_text(f"{tag}/{MANIFEST}", manifest["text"])
                self.home.write_text(LATEST, tag + "\n")
            elif self._host_leader:
                shutil.rmtree(final, ignore_errors=True)  # published; rank 0's node keeps the working copy

        each("writing the manifest and latest", commit, n, group)

        def retain() -> None:  # the checkpoint is published: a failure to delete old ones is only reported
            if self.rank == 0:
                try:
                    self._retain(keep_last)
                except Exception as exc:
                    log.warning("removing checkpoints older than the last %d failed (%s: %s); the next checkpoint "
                                "tries again", keep_last, type(exc).__name__, exc)

        each("retention", retain, n, group)
        self.last_bytes = manifest["bytes"]
        return Checkpoint(final, staged.step, self.world_size)

    def _discard(self, staged: Staged) -> None:
        """After a failed publication, on every rank (no collective): remove what it left, in the working copy
        and the home folder, unless `latest` already names it (then it is whole)."""
        try:
            named = (self.home.read_text(LATEST) or "").strip() == staged.tag
            if self._host_leader:
                shutil.rmtree(staged.stage_dir, ignore_errors=True)
                if not named:
                    shutil.rmtree(self.root / staged.tag, ignore_errors=True)
            if self.rank == 0 and not named:
                self.home.remove(staged.tag)
        except Exception as exc:  # what is left is never chosen (no manifest, or not `latest`)
            log.warning("cleaning up after the failed checkpoint of step %d failed (%s: %s)", staged.step,
                        type(exc).__name__, exc)

    def _manifest(self, stage_dir: Path, step: int, group=None) -> dict:
        """Every rank's written files with their sizes and checksums (each rank hashes the files it owns);
        returned on every rank with the rank's own share of the files to publish. Collective on `group`."""
        n = self.world_size
        listings = each("listing the staged files", lambda: {
            str(f.relative_to(stage_dir)): f.stat().st_size for f in stage_dir.rglob("*") if f.is_file()}, n, group)
        owners = file_owners(listings, n)
        mine = [rel for rel, owner in owners.items() if owner == self.rank]
        digests = each("checksums", lambda: {rel: sha256(stage_dir / rel) for rel in mine}, n, group)
        files = {rel: listings[owner][rel] for rel, owner in owners.items()}
        text = json.dumps({"step": step, "world_size": n, "files": files,
                           "sha256": {rel: d for share in digests for rel, d in share.items()}}, indent=1)
        return {"text": text, "mine": mine, "bytes": sum(files.values())}

    def _retain(self, keep_last: int) -> None:
        for old in self.published()[:-keep_last]:
            self.home.remove(old.tag)
            shutil.rmtree(old.path, ignore_errors=True)  # its working copy (already gone for a local run)
