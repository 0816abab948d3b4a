"""What the ranks exchange while they read or write a checkpoint: which rank reads (checksums, uploads)
which file, and collectives that carry every rank's outcome, so that one rank's failure fails the step on
every rank instead of leaving the others waiting."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from trainer.checkpoint_layout import CheckpointError
from trainer.storage import sha256

_RANK_IN_NAME = re.compile(r"(?:zero_pp_rank_|^rank_)0*(\d+)")


def reader_of(rel: str, world_size: int) -> int:
    """The rank that checksums a file: the one that wrote it where the name says (DeepSpeed's per-rank
    ZeRO shards, zeroray's rank states), else rank 0, so that each rank mostly reads its own files."""
    found = _RANK_IN_NAME.search(Path(rel).name)
    return int(found.group(1)) % world_size if found else 0


def distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def barrier(world_size: int, group=None) -> None:
    if distributed(world_size):
        dist.barrier(group=group)


def gathered(value, world_size: int, group=None) -> list:
    """`value` of every rank, by rank (a collective when distributed; on `group`, default the world's)."""
    if not distributed(world_size):
        return [value]
    values: list = [None] * world_size
    dist.all_gather_object(values, value, group=group)
    return values


def each(what: str, work: Callable[[], object], world_size: int, group=None) -> list:
    """Run this rank's `work`, then exchange every rank's outcome (a collective on `group`): the results by
    rank on every rank, or the same CheckpointError on every rank, naming each rank that failed. A failure on
    one rank so never leaves the others waiting in the next collective."""
    try:
        outcome = (work(), None)
    except Exception as exc:  # OSError of a full disk, the object store's own error types, …
        outcome = (None, f"{type(exc).__name__}: {exc}")
    outcomes = gathered(outcome, world_size, group)
    failed = [f"rank {r}: {error}" for r, (_, error) in enumerate(outcomes) if error is not None]
    if failed:
        raise CheckpointError(f"{what} failed ({'; '.join(failed)})")
    return [result for result, _ in outcomes]


def checksums(folder: Path, files: list[str], rank: int, world_size: int) -> dict[str, str]:
    """SHA-256 of this rank's share of `files`, gathered on every rank (a collective when distributed)."""
    mine = {rel: sha256(folder / rel) for rel in files if reader_of(rel, world_size) == rank}
    return {rel: digest for share in gathered(mine, world_size) for rel, digest in share.items()}


def file_owners(listings: list[dict[str, int]], world_size: int) -> dict[str, int]:
    """The rank that checksums (and uploads) each written file: the one the name says if it can see the
    file, else the lowest rank that can (on a shared disk every rank sees every file; on node-local
    disks a rank sees its node's)."""
    owners = {}
    for rel in sorted({rel for listing in listings for rel in listing}):
        preferred = reader_of(rel, world_size) % len(listings)
        owners[rel] = preferred if rel in listings[preferred] else min(
            r for r, listing in enumerate(listings) if rel in listing)
    return owners

