"""No code runs from a checkpoint: a pickle that would create a marker file, put in place of a rank state, a
model-state file or a ZeRO optimizer shard, is refused by resume and export with a clear error, and the
marker never appears. Real states round-trip (RNG, data position, DeepSpeed's own files)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines import BatchStream
from launcher.export import consolidated_state_dict
from tests.conftest import free_ports
from trainer.checkpoint import Checkpoint, CheckpointError, CheckpointStore
from trainer.errors import ZerorayError
from trainer.rng import rng_state, set_rng_state
from trainer.safe_load import UnsafeCheckpointError, load_file, weights_only_loads
from trainer.spec import load_spec


class Payload:
    """Unpickling this calls os.system: the attack a shared bucket allows without a weights-only load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": Payload(marker)}, path)


def test_the_payload_is_real(tmp_path):
    """The planted file does run code when unpickled the old way: the refusals below mean something."""
    marker = tmp_path / "marker"
    plant(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_a_planted_rank_state_is_refused_at_resume(tmp_path):
    marker = tmp_path / "marker"
    ckpt = Checkpoint(tmp_path / "checkpoints" / "step_00000004", 4, 1)
    plant(ckpt.path / "rank_00000.pt", marker)
    with pytest.raises(CheckpointError, match="rank_00000.pt holds objects zeroray does not load"):
        CheckpointStore(tmp_path / "checkpoints").rank_state(ckpt)
    assert not marker.exists()


def test_deepspeed_own_loads_are_weights_only_inside_the_guard(tmp_path):
    """DeepSpeed passes weights_only=False itself; inside weights_only_loads() it cannot."""
    marker = tmp_path / "marker"
    plant(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with weights_only_loads(), pytest.raises(UnsafeCheckpointError):
        torch.load(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    assert not marker.exists()
    assert torch.load.__module__ == "torch.serialization", "the guard restores torch.load"


@pytest.mark.parametrize("stage", [0, 2])
def test_export_refuses_planted_model_and_optimizer_files(stage, tmp_path, tiny_config):
    marker = tmp_path / "marker"
    spec = load_spec(tiny_config, [f"trainer.zero_stage={stage}"])
    ckpt = Checkpoint(tmp_path / "checkpoints" / "step_00000004", 4, 1)
    plant(ckpt.path / "mp_rank_00_model_states.pt", marker)
    if stage:
        plant(ckpt.path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(ZerorayError, match="holds objects zeroray does not load"):
        consolidated_state_dict(ckpt, spec)
    assert not marker.exists()


def test_a_real_rank_state_round_trips_through_the_weights_only_load(tmp_path, tiny_config):
    spec = load_spec(tiny_config)
    stream = BatchStream(spec.data, micro_batch=4)
    for _ in range(3):
        next(stream)
    random.random(), np.random.rand(), torch.rand(1)
    state = {"data": stream.state_dict(), "rng": rng_state()}
    torch.save(state, tmp_path / "rank_00000.pt")  # what CheckpointStore.save writes
    loaded = load_file(tmp_path / "rank_00000.pt")
    set_rng_state(loaded["rng"])
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(state["rng"])
    assert draws == (random.random(), float(np.random.rand()), float(torch.rand(1)))
    resumed = BatchStream(spec.data, micro_batch=4)
    resumed.load_state_dict(loaded["data"])
    expected, got = next(stream), next(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


SAVE_CHECKPOINTS = """
import os, sys, torch, deepspeed
from trainer.build import skip_inference_comm_op
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
skip_inference_comm_op()  # as the trainer does: no JIT build of DeepSpeed's shm op on a clean machine
deepspeed.init_distributed(dist_backend="gloo")
for stage in (0, 2):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    config = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}, "zero_optimization": {"stage": stage},
              # torch's AdamW, as trainer/ds_config.py asks: DeepSpeed's own would JIT-build its fused_adam op
              # (about 90 CPU seconds on a machine whose extension cache is empty, as on CI)
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True, "adam_w_mode": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    engine.backward(engine(torch.randn(2, 8, dtype=torch.bfloat16)).float().sum())
    engine.step()
    engine.save_checkpoint(os.path.join(sys.argv[1], f"z{stage}"), tag="t")
"""


@pytest.mark.slow  # a fresh interpreter that imports DeepSpeed (~10 s)
def test_deepspeed_checkpoints_load_weights_only(tmp_path):
    """Every file DeepSpeed writes (ZeRO-0 and ZeRO-2, bf16, one rank) loads through the weights-only
    guard: the allowlist holds what they need."""
    import subprocess
    import sys

    port = free_ports()[0]
    done = subprocess.run([sys.executable, "-c", SAVE_CHECKPOINTS, str(tmp_path), str(port)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in (0, 2):
        files = sorted((tmp_path / f"z{stage}" / "t").glob("*.pt"))
        assert len(files) >= (1 if stage == 0 else 2), files
        with weights_only_loads():
            for f in files:
                assert isinstance(torch.load(f, weights_only=False), dict), f
