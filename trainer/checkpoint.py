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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

log = logging.getLogger("zeroray.checkpoint")

STAGING_PREFIX = ".staging-"
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


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step: a reader sees the old file or the new one, whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


_RANK_IN_NAME = re.compile(r"(?:zero_pp_rank_|^rank_)0*(\d+)")


def _reader(rel: str, world_size: int) -> int:
    """The rank that checksums a file: the one that wrote it where the name says (DeepSpeed's per-rank
    ZeRO shards, zeroray's rank states), else rank 0, so that each rank mostly reads its own files."""
    found = _RANK_IN_NAME.search(Path(rel).name)
    return int(found.group(1)) % world_size if found else 0


def _checksums(folder: Path, files: list[str], rank: int, world_size: int) -> dict[str, str]:
    """SHA-256 of this rank's share of `files`, gathered on every rank (a collective when distributed)."""
    mine = {rel: _sha256(folder / rel) for rel in files if _reader(rel, world_size) == rank}
    if not (dist.is_available() and dist.is_initialized()) or world_size == 1:
        return mine
    shares: list[dict[str, str]] = [{} for _ in range(world_size)]
    dist.all_gather_object(shares, mine)
    return {rel: digest for share in shares for rel, digest in share.items()}


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
    def __init__(self, root: Path, rank: int, world_size: int):
        self.root = Path(root)
        self.rank = rank
        self.world_size = world_size

    # ---- reading --------------------------------------------------------------------------
    def published(self) -> list[Checkpoint]:
        """Complete checkpoints, oldest first (a folder without a valid manifest is not one)."""
        found = []
        for d in sorted(self.root.glob("step_*")):
            manifest = self._verified_manifest(d)
            if manifest is not None:
                found.append(Checkpoint(d, manifest["step"], manifest["world_size"]))
        return found

    def latest(self) -> Checkpoint | None:
        pointer = self.root / LATEST
        published = self.published()
        if pointer.is_file():
            tag = pointer.read_text().strip()
            for ckpt in published:
                if ckpt.tag == tag:
                    return ckpt
        # The pointer is missing or names a damaged checkpoint: fall back to the newest whole one.
        fallback = published[-1] if published else None
        if pointer.is_file():
            log.warning("checkpoint %s named by %s is incomplete or damaged; using %s instead",
                        tag, pointer, fallback.path if fallback else "none (starting from step 0)")
        return fallback

    def _verified_manifest(self, folder: Path) -> dict | None:
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
        reported and the one before it tried. Collective: call on every rank (each reads its share)."""
        candidates = self.published()
        chosen = self.latest()
        candidates = [c for c in candidates if chosen is not None and c.step <= chosen.step]
        while candidates:
            ckpt = candidates.pop()
            expected = json.loads((ckpt.path / MANIFEST).read_text()).get("sha256")
            if expected is None:  # written before manifests had checksums: sizes were checked
                return ckpt
            actual = _checksums(ckpt.path, sorted(expected), self.rank, self.world_size)
            damaged = sorted(rel for rel, digest in expected.items() if actual.get(rel) != digest)
            if not damaged:
                return ckpt
            if self.rank == 0:
                log.warning("checkpoint %s is damaged: %s do not match the checksums in its manifest; using %s "
                            "instead", ckpt.path, ", ".join(damaged),
                            candidates[-1].path if candidates else "none (starting from step 0)")
        return None

    def rank_state(self, ckpt: Checkpoint, rank: int | None = None) -> dict:
        """Data position and RNG of one rank (default: this one) as the checkpoint saved them."""
        rank = self.rank if rank is None else rank
        return torch.load(ckpt.path / f"rank_{rank:05d}.pt", weights_only=False)

    def universal(self, ckpt: Checkpoint) -> Path:
        """The checkpoint in DeepSpeed's universal format (whole, unpartitioned optimizer state), which
        loads on any number of ranks. Rank 0 converts with DeepSpeed's own `ds_to_universal`, next to
        the published checkpoints (never inside one: a published folder is not changed); every rank
        waits for it. Call on every rank."""
        out = self.root / UNIVERSAL / ckpt.tag
        if self.rank == 0 and not (out / "zero").is_dir():
            shutil.rmtree(out, ignore_errors=True)
            proc = subprocess.run(
                [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt.path),
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
        dist.barrier()
        return out

    def remove_universal(self) -> None:
        shutil.rmtree(self.root / UNIVERSAL, ignore_errors=True)

    # ---- writing --------------------------------------------------------------------------
    def remove_staging(self) -> None:
        """Rank 0, before training: drop folders that a crash left half-written."""
        for d in self.root.glob(STAGING_PREFIX + "*"):
            shutil.rmtree(d, ignore_errors=True)

    def save(self, engine, step: int, rank_state: dict, run_files: dict[str, str], keep_last: int) -> Checkpoint:
        """Collective: every rank calls it. `rank_state` is this rank's own (data position, RNG);
        `run_files` are small text files rank 0 adds (the spec, the trainer state)."""
        tag = tag_for(step)
        staging = STAGING_PREFIX + tag
        self.root.mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(str(self.root), tag=staging, save_latest=False)
        stage_dir = self.root / staging
        torch.save(rank_state, stage_dir / f"rank_{self.rank:05d}.pt")
        if self.rank == 0:
            for name, text in run_files.items():
                (stage_dir / name).write_text(text)
        dist.barrier()
        final = self.root / tag
        written = sorted(str(f.relative_to(stage_dir)) for f in stage_dir.rglob("*") if f.is_file())
        sha256 = _checksums(stage_dir, written, self.rank, self.world_size)
        if self.rank == 0:
            files = {rel: (stage_dir / rel).stat().st_size for rel in written}
            _fsync_tree(stage_dir)
            manifest = {"step": step, "world_size": self.world_size, "files": files, "sha256": sha256}
            write_atomic(stage_dir / MANIFEST, json.dumps(manifest, indent=1))
            if final.exists():  # a re-run of the same step after a crash: replace it
                shutil.rmtree(final)
            os.replace(stage_dir, final)
            write_atomic(self.root / LATEST, tag + "\n")
            for old in self.published()[:-keep_last]:
                shutil.rmtree(old.path, ignore_errors=True)
        dist.barrier()
        return Checkpoint(final, step, self.world_size)
