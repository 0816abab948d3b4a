"""What the entry points import: every module a process imports at start-up costs CPU on every rank of every
launch (docs/performance.md, start-up), so heavy libraries stay out of the paths that do not use them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO, free_ports


def imported_by(statement: str) -> set[str]:
    """The top-level packages a fresh interpreter holds after `statement`."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_a_training_rank_does_not_import_transformers():
    """The step loop, its hooks and the model families a rank builds by default (llama) need torch,
    DeepSpeed and `datasets`; `transformers` only for export, generation with a cache and ConvBERT."""
    held = imported_by("import trainer.loop, models")
    assert {"torch", "datasets"} <= held, held
    assert "transformers" not in held


def test_the_driver_does_not_import_deepspeed():
    """`zeroray train` on the driver: the CLI, the launch, Ray Train's TorchTrainer (torch) and the data check
    (`datasets`) run there; DeepSpeed only in the ranks, so the driver's start does not pay its import."""
    held = imported_by("import launcher.cli, launcher.ray_launch, launcher.ray_trainer, ray.train.torch")
    assert {"torch", "datasets", "ray"} <= held, held
    assert "deepspeed" not in held


def test_listing_and_plotting_runs_import_neither_torch_nor_datasets(tmp_path, tiny_config):
    """`zeroray runs` and `zeroray plot` read a run's files: without torch, DeepSpeed and `datasets` they
    answer in a fraction of a second instead of about 3 s."""
    from trainer.spec import load_spec

    run = tmp_path / "runs" / "listed"
    (run / "checkpoints").mkdir(parents=True)
    (run / "spec.yaml").write_text(load_spec(tiny_config).to_yaml())
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.5}\n{"step": 2, "loss": 5.25}\n')
    held = imported_by(
        "from launcher.cli import main\n"
        f"assert main(['runs', '--dir', {str(run.parent)!r}]) == 0\n"
        f"assert main(['plot', {str(run)!r}, '-o', {str(tmp_path / 'loss.png')!r}]) == 0"
    )
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert "matplotlib" in held and not {"torch", "deepspeed", "datasets"} & held, held


START_A_PROCESS_GROUP = """
import os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed.comm.comm as ds_comm
from trainer.build import init_distributed
from trainer.spec import load_spec
print(init_distributed(load_spec(sys.argv[1])), ds_comm.cdb.shm_comm_op)
"""


def test_a_rank_starts_its_process_group_without_compiling_deepspeed_ops(tmp_path, tiny_config):
    """On a machine whose extension cache is empty (a clean clone, CI, a new user's first demo) DeepSpeed's
    CPU backend would JIT-build its shared-memory inference all-reduce op at init_distributed (about 60 s of
    both cores here); training never uses it, so the trainer's start builds and loads nothing."""
    port = free_ports()[0]
    extensions = tmp_path / "torch_extensions"
    done = subprocess.run([sys.executable, "-c", START_A_PROCESS_GROUP, str(tiny_config), str(port)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu",
                               "TORCH_EXTENSIONS_DIR": str(extensions)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "(0, 1) None", done.stdout[-2000:]
    assert not extensions.exists() or not any(extensions.rglob("*.so")), sorted(extensions.rglob("*"))
