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
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from trainer.safe_load import UnsafeCheckpointError, load_file
from trainer.storage import Folder, LocalFolder, fsync_tree, sha256

log = logging.getLogger("zeroray.checkpoint")

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


_RANK_IN_NAME = re.compile(r"(?:zero_pp_rank_|^rank_)0*(\d+)")


def _reader(rel: str, world_size: int) -> int:
    """The rank that checksums a file: the one that wrote it where the name says (DeepSpeed's per-rank
    ZeRO shards, zeroray's rank states), else rank 0, so that each rank mostly reads its own files."""
    found = _RANK_IN_NAME.search(Path(rel).name)
    return int(found.group(1)) % world_size if found else 0


def _distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def _barrier(world_size: int, group=None) -> None:
    if _distributed(world_size):
        dist.barrier(group=group)


def _gathered(value, world_size: int, group=None) -> list:
    """`value` of every rank, by rank (a collective when distributed; on `group`, default the world's)."""
    if not _distributed(world_size):
        return [value]
    values: list = [None] * world_size
    dist.all_gather_object(values, value, group=group)
    return values


def _each(what: str, work: Callable[[], object], world_size: int, group=None) -> list:
    """Run this rank's `work`, then exchange every rank's outcome (a collective on `group`): the results by
    rank on every rank, or the same CheckpointError on every rank, naming each rank that failed. A failure on
    one rank so never leaves the others waiting in the next collective."""
    try:
        outcome = (work(), None)
    except Exception as exc:  # OSError of a full disk, the object store's own error types, …
        outcome = (None, f"{type(exc).__name__}: {exc}")
    outcomes = _gathered(outcome, world_size, group)
    failed = [f"rank {r}: {error}" for r, (_, error) in enumerate(outcomes) if error is not None]
    if failed:
        raise CheckpointError(f"{what} failed ({'; '.join(failed)})")
    return [result for result, _ in outcomes]


def _checksums(folder: Path, files: list[str], rank: int, world_size: int) -> dict[str, str]:
    """SHA-256 of this rank's share of `files`, gathered on every rank (a collective when distributed)."""
    mine = {rel: sha256(folder / rel) for rel in files if _reader(rel, world_size) == rank}
    return {rel: digest for share in _gathered(mine, world_size) for rel, digest in share.items()}


def _owners(listings: list[dict[str, int]], world_size: int) -> dict[str, int]:
    """The rank that checksums (and uploads) each written file: the one the name says if it can see the
    file, else the lowest rank that can (on a shared disk every rank sees every file; on node-local
    disks a rank sees its node's)."""
    owners = {}
    for rel in sorted({rel for listing in listings for rel in listing}):
        preferred = _reader(rel, world_size) % len(listings)
        owners[rel] = preferred if rel in listings[preferred] else min(
            r for r, listing in enumerate(listings) if rel in listing)
    return owners


def rng_state() -> dict:
    accel = get_accelerator()
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "accelerator": None if accel.device_name() == "cpu" else accel.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["accelerator"] is not None:
        get_accelerator().set_rng_state(state["accelerator"])


class CheckpointStore:
    """The checkpoints of one run: `root` is this node's working folder, `home` where they are published
    (default: `root` itself)."""

    def __init__(self, root: Path, rank: int = 0, world_size: int = 1, home: Folder | None = None):
        self.root = Path(root)
        self.rank = rank
        self.world_size = world_size
        self.home = home if home is not None else LocalFolder(self.root)
        self.last_bytes = 0  # the size of the last checkpoint this store published (all ranks' files)
        # Which ranks share a working copy: one download and one clean-up per copy. One folder every rank
        # sees counts as one host. Gathered here, where every rank constructs the store at the same point.
        self._hosts = (_gathered(socket.gethostname(), world_size) if self.home.per_node_copies
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

    # ---- reading --------------------------------------------------------------------------
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
        actual = _checksums(ckpt.path, sorted(expected), self.rank, self.world_size)
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
        _barrier(self.world_size)

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
        _barrier(self.world_size)
        if self._several_copies and self._host_leader and self._hosts[self.rank] != self._hosts[0]:
            shutil.rmtree(out, ignore_errors=True)
            self.home.get(f"{UNIVERSAL}/{ckpt.tag}", out)
        _barrier(self.world_size)
        return out

    def remove_universal(self) -> None:
        """After every rank loaded the conversion. Call on every rank."""
        if self._host_leader:
            shutil.rmtree(self.root / UNIVERSAL, ignore_errors=True)
        if self.rank == 0 and self._several_copies:
            self.home.remove(UNIVERSAL)

    # ---- writing --------------------------------------------------------------------------
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
        _each("staging", lambda: None, n, group)  # every rank's files are written before any rank lists them
        manifest = self._manifest(stage_dir, staged.step, group)

        def local_publish() -> None:  # in the working copy: one rename
            if self._host_leader:
                if self.rank == 0:
                    fsync_tree(stage_dir)
                    (stage_dir / MANIFEST).write_text(manifest["text"])
                shutil.rmtree(final, ignore_errors=True)  # a re-run of the same step after a crash: replace it
                os.replace(stage_dir, final)

        _each("publishing in the working copy", local_publish, n, group)

        def upload() -> None:  # to the home folder: each file by its owner (for a local run, no-ops)
            for rel in manifest["mine"]:
                self.home.put(final / rel, f"{tag}/{rel}")
            if before_manifest is not None:
                before_manifest(staged)

        _each("copying the files to the home folder", upload, n, group)  # all in place before the manifest

        def commit() -> None:  # the manifest says the checkpoint exists, `latest` that it is the one
            if self.rank == 0:
                self.home.write_text(f"{tag}/{MANIFEST}", manifest["text"])
                self.home.write_text(LATEST, tag + "\n")
            elif self._host_leader:
                shutil.rmtree(final, ignore_errors=True)  # published; rank 0's node keeps the working copy

        _each("writing the manifest and latest", commit, n, group)

        def retain() -> None:  # the checkpoint is published: a failure to delete old ones is only reported
            if self.rank == 0:
                try:
                    self._retain(keep_last)
                except Exception as exc:
                    log.warning("removing checkpoints older than the last %d failed (%s: %s); the next checkpoint "
                                "tries again", keep_last, type(exc).__name__, exc)

        _each("retention", retain, n, group)
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
        listings = _each("listing the staged files", lambda: {
            str(f.relative_to(stage_dir)): f.stat().st_size for f in stage_dir.rglob("*") if f.is_file()}, n, group)
        owners = _owners(listings, n)
        mine = [rel for rel, owner in owners.items() if owner == self.rank]
        digests = _each("checksums", lambda: {rel: sha256(stage_dir / rel) for rel in mine}, n, group)
        files = {rel: listings[owner][rel] for rel, owner in owners.items()}
        text = json.dumps({"step": step, "world_size": n, "files": files,
                           "sha256": {rel: d for share in digests for rel, d in share.items()}}, indent=1)
        return {"text": text, "mine": mine, "bytes": sum(files.values())}

    def _retain(self, keep_last: int) -> None:
        for old in self.published()[:-keep_last]:
            self.home.remove(old.tag)
            shutil.rmtree(old.path, ignore_errors=True)  # its working copy (already gone for a local run)
