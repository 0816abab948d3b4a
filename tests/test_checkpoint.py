"""Choosing the checkpoint to resume from: manifests, the `latest` pointer, half-written folders.

The writing side runs with real DeepSpeed engines in test_train_ray.py; here the folders are laid out
by hand to produce the damaged states a crash or a bad disk leaves behind.
"""

from __future__ import annotations

import hashlib
import json
import logging

from trainer.checkpoint import MANIFEST, STAGING_PREFIX, CheckpointStore, tag_for


def publish(root, step: int, payload: bytes = b"weights") -> None:
    folder = root / tag_for(step)
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(payload)
    (folder / MANIFEST).write_text(json.dumps({"step": step, "world_size": 2, "files": {"model.pt": len(payload)},
                                               "sha256": {"model.pt": hashlib.sha256(payload).hexdigest()}}))
    (root / "latest").write_text(tag_for(step) + "\n")


def test_latest_follows_the_pointer(tmp_path):
    publish(tmp_path, 10)
    publish(tmp_path, 20)
    store = CheckpointStore(tmp_path, 0, 2)
    assert [c.step for c in store.published()] == [10, 20]
    assert store.latest().step == 20 and store.latest().world_size == 2


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    publish(tmp_path, 10)
    publish(tmp_path, 20)
    (tmp_path / tag_for(20) / "model.pt").write_bytes(b"trunc")  # size no longer matches the manifest
    with caplog.at_level(logging.WARNING, logger="zeroray.checkpoint"):
        latest = CheckpointStore(tmp_path, 0, 2).latest()
    assert latest.step == 10
    assert "incomplete or damaged" in caplog.text and tag_for(20) in caplog.text


def test_a_shard_damaged_in_place_is_caught_by_its_checksum(tmp_path, caplog):
    publish(tmp_path, 10)
    publish(tmp_path, 20)
    (tmp_path / tag_for(20) / "model.pt").write_bytes(b"weightz")  # same size, other bytes
    store = CheckpointStore(tmp_path, 0, 1)
    assert store.latest().step == 20, "sizes alone do not see it"
    with caplog.at_level(logging.WARNING, logger="zeroray.checkpoint"):
        assert store.verified_latest().step == 10
    assert "model.pt do not match the checksums" in caplog.text and tag_for(20) in caplog.text
    (tmp_path / tag_for(10) / "model.pt").write_bytes(b"w" * 7)
    assert store.verified_latest() is None, "no whole checkpoint left: start from step 0"


def test_half_written_folders_are_never_chosen_and_are_removed(tmp_path):
    publish(tmp_path, 10)
    staging = tmp_path / (STAGING_PREFIX + tag_for(20))
    staging.mkdir()
    (staging / "model.pt").write_bytes(b"partial")
    no_manifest = tmp_path / tag_for(30)  # renamed but its manifest never landed
    no_manifest.mkdir()
    store = CheckpointStore(tmp_path, 0, 2)
    assert store.latest().step == 10
    store.remove_staging()
    assert not staging.exists() and (tmp_path / tag_for(10)).exists()


def test_no_checkpoint_and_missing_pointer(tmp_path):
    assert CheckpointStore(tmp_path / "none", 0, 1).latest() is None
    publish(tmp_path, 5)
    (tmp_path / "latest").unlink()
    assert CheckpointStore(tmp_path, 0, 1).latest().step == 5
