"""Run directories on object storage (`output.dir: s3://…`), against a real S3-compatible server (moto, with
credentials checked): a ZeRO-3 run writes its checkpoints, metrics, logs and spec there; after a crash a
driver on another machine (an empty working copy) resumes from S3 with the same losses; half-uploaded and
damaged checkpoints are never resumed from; bad storage settings give clear errors before anything starts.
The credentials come from the environment (tests/s3_server.py), as the spec refuses them in storage_options."""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import posixpath
import shutil
import tempfile
import time

import pytest

from launcher.ray_launch import launch
from tests.conftest import write_config
from tests.export_check import check_export
from tests.s3_server import s3_server
from trainer.checkpoint import MANIFEST, CheckpointStore, tag_for
from trainer.errors import SpecError, ZerorayError
from trainer.run_prep import prepare_run_dir
from trainer.spec import load_spec
from trainer.storage import RemoteFolder

BUCKET = "zr-runs"


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        server.filesystem().mkdir(BUCKET)
        yield server


def output(server, name: str, cache, **extra) -> dict:
    return {"dir": f"s3://{BUCKET}/runs", "name": name, "storage_options": server.storage_options(),
            "cache_dir": str(cache), **extra}


def remote_records(remote: RemoteFolder) -> list[dict]:
    return [json.loads(line) for line in remote.read_text("metrics.jsonl").splitlines()]


@pytest.fixture
def ray_started_after_credentials(s3):
    """A temporary folder for Ray, and no Ray cluster running, so that `launch` starts its embedded one
    there, as `zeroray train` does: the credentials in this process's environment reach the workers. Ray
    workers inherit the environment the cluster was started with; one started before the S3 server exported
    its keys (`ray_local`, by a test of another module) would not see them, so it is stopped for this test
    and started again after."""
    import ray

    was_running = ray.is_initialized()
    ray.shutdown()
    temp = tempfile.mkdtemp(prefix="zr-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    yield temp
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
    if was_running:  # as conftest's ray_local started it, for the tests after this one
        again = tempfile.mkdtemp(prefix="zr-ray-", dir="/tmp")
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir=again)
        atexit.register(shutil.rmtree, again, True)


@pytest.mark.slow
def test_zero3_run_on_s3_resumes_from_s3_on_a_new_machine_after_a_crash(ray_started_after_credentials, s3,
                                                                         small_corpus, tmp_path):
    config = write_config(tmp_path / "zero3.yaml", small_corpus, tmp_path / "unused", trainer={"zero_stage": 3},
                          output=output(s3, "zero3", tmp_path / "machine-a"))
    spec = load_spec(config)
    result = launch(spec, announce=lambda s: None, ray_temp_dir=ray_started_after_credentials)
    remote = spec.output.remote
    full = remote_records(remote)
    assert [r["step"] for r in full] == list(range(1, 13))
    first3, last3 = (sum(r["loss"] for r in part) / 3 for part in (full[:3], full[-3:]))
    assert last3 < first3 - 0.25, "the loss falls"
    assert [c.step for c in CheckpointStore.of_run(spec.output).published()] == [6, 12], "listed from S3"
    assert remote.read_text("checkpoints/latest").strip() == tag_for(12)
    manifest = json.loads(remote.read_text(f"checkpoints/{tag_for(12)}/{MANIFEST}"))
    on_s3 = remote.sizes(f"checkpoints/{tag_for(12)}")
    assert {rel: on_s3[rel] for rel in manifest["files"]} == manifest["files"]
    assert any("zero_pp_rank_1" in rel for rel in manifest["files"]), "rank 1's ZeRO-3 shard went up too"
    assert json.loads(remote.read_text("status.json"))["status"] == "finished"
    assert "resumed" not in remote.read_text("logs/rank_1.log") and remote.read_text("spec.yaml")
    assert result.ray_checkpoint == str(result.run.root / "checkpoints" / tag_for(12))

    # The run dies right after its step-6 checkpoint (step 12 never landed on S3), and with it the
    # driver's machine: the same command on another machine (an empty working copy) resumes from S3.
    remote.remove(f"checkpoints/{tag_for(12)}")
    remote.write_text("checkpoints/latest", tag_for(6) + "\n")
    elsewhere = load_spec(config, [f"output.cache_dir={tmp_path / 'machine-b'}"])
    said: list[str] = []
    again = launch(elsewhere, announce=said.append, ray_temp_dir=ray_started_after_credentials)
    assert said[0] == f"resuming s3://{BUCKET}/runs/zero3 from {tag_for(6)}"
    assert again.run.root.is_relative_to(tmp_path / "machine-b")
    resumed = remote_records(remote)[len(full):]
    assert [r["step"] for r in resumed] == list(range(7, 13)), "resumes at the saved step"
    for before, after in zip(full[6:], resumed, strict=True):
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-5, abs=1e-5)
    assert "resumed from" in remote.read_text("logs/rank_1.log")
    check_export(again.run.root, tmp_path / "hf", last_loss=resumed[-1]["loss"])

    # Every file the runs wrote — both working copies, the export, every object on S3 — holds neither
    # the access key nor the secret (they travelled in the environment only).
    secrets = (s3.key.encode(), s3.secret.encode())
    local = [f for f in tmp_path.rglob("*") if f.is_file()]
    on_s3 = [posixpath.join(remote.root, rel) for rel in remote.sizes()]
    assert len(local) > 50 and len(on_s3) > 20, (len(local), len(on_s3))
    leaked = [str(f) for f in local if any(x in f.read_bytes() for x in secrets)]
    leaked += [path for path in on_s3 if any(x in remote.fs.cat_file(path) for x in secrets)]
    assert not leaked, leaked


def publish(remote: RemoteFolder, step: int, payload: bytes, manifest: bool = True) -> None:
    """A checkpoint laid out on S3 by hand; without `manifest`: an upload the crash cut short."""
    tag = tag_for(step)
    remote.write_text(f"{tag}/model.pt", payload.decode())
    if manifest:
        remote.write_text(f"{tag}/{MANIFEST}", json.dumps({
            "step": step, "world_size": 1, "files": {"model.pt": len(payload)},
            "sha256": {"model.pt": hashlib.sha256(payload).hexdigest()}}))
        remote.write_text("latest", tag + "\n")


def test_half_uploaded_and_damaged_checkpoints_on_s3_are_not_resumed_from(s3, tmp_path, caplog):
    remote = RemoteFolder(f"s3://{BUCKET}/store-{time.time_ns()}/checkpoints", s3.storage_options())
    publish(remote, 10, b"weights-10")
    publish(remote, 20, b"weights-20")
    publish(remote, 30, b"weights-30", manifest=False)  # crashed mid-upload: latest still names step 20
    store = CheckpointStore(tmp_path / "copy", 0, 1, remote)
    assert [c.step for c in store.published()] == [10, 20]
    chosen = store.verified_latest()
    assert chosen.step == 20 and (chosen.path / "model.pt").read_bytes() == b"weights-20", "downloaded"

    # The node's copy goes bad in place: checked against the manifest, it is fetched again.
    (chosen.path / "model.pt").write_bytes(b"weights-2X")
    assert (store.verified_latest().path / "model.pt").read_bytes() == b"weights-20"

    # The copy on S3 goes bad: the previous checkpoint is used, and the log says why.
    remote.write_text(f"{tag_for(20)}/model.pt", "weights-2Y")
    with caplog.at_level(logging.WARNING, logger="zeroray.checkpoint"):
        fallback = CheckpointStore(tmp_path / "other-copy", 0, 1, remote).verified_latest()
    assert fallback.step == 10 and (fallback.path / "model.pt").read_bytes() == b"weights-10"
    assert f"s3://{BUCKET}" in caplog.text and "model.pt do not match the checksums" in caplog.text


def test_bad_storage_settings_fail_before_anything_starts(s3, small_corpus, tmp_path):
    def spec_with(**changes):
        config = write_config(tmp_path / "bad.yaml", small_corpus, tmp_path / "unused",
                              output=output(s3, "bad", tmp_path / "cache", **changes))
        return load_spec(config)

    # Keys in the spec are refused by name, with where they go instead, before anything is written.
    with pytest.raises(SpecError, match=r"output.storage_options.key, output.storage_options.secret look like "
                                        r"credentials.*AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") as err:
        spec_with(storage_options=s3.storage_options(key=s3.key, secret=s3.secret))
    assert s3.key not in str(err.value) and s3.secret not in str(err.value)
    assert not (tmp_path / "cache").exists() and not s3.filesystem().exists(f"{BUCKET}/runs/bad")

    with s3.credentials(secret="not-the-secret"):
        wrong_secret = spec_with()
        with pytest.raises(ZerorayError, match=rf"output.dir s3://{BUCKET}/runs/bad cannot be written "
                                               rf".*storage_options") as err:
            prepare_run_dir(wrong_secret, fresh=False)
    assert "not-the-secret" not in str(err.value)
    with pytest.raises(ZerorayError, match="cannot be written"):
        prepare_run_dir(spec_with(dir="s3://no-such-bucket-zr/runs"), fresh=False)
    with pytest.raises(SpecError, match="memory:// lives inside one process"):
        spec_with(dir="memory://runs")
    with pytest.raises(SpecError, match="fsspec knows no storage 'nosuch'"):
        spec_with(dir="nosuch://bucket/runs")
