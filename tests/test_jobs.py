"""Remote runs: `zeroray submit | sweep | status | logs | stop` against a real Ray head with its job
server and token authentication, and `zeroray cluster up|down|status` checking files before Ray."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from launcher.cli import main
from launcher.sweep import expand_sweep, split_values, sweep_name
from tests.conftest import free_ports, write_config
from trainer.errors import SpecError

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


# ---- no cluster needed ---------------------------------------------------------------------


def test_sweep_is_the_cartesian_product_and_keeps_bracketed_commas_together():
    assert split_values("1e-3,3e-3") == ["1e-3", "3e-3"]
    assert split_values("{num_experts: 4, top_k: 2},[1, 2],'a,b'") == ["{num_experts: 4, top_k: 2}", "[1, 2]", "'a,b'"]
    combos = expand_sweep(["trainer.lr=1e-3,3e-3", "model.moe={num_experts: 4, top_k: 2},null", "trainer.max_steps=5"])
    assert [overrides for overrides, _ in combos] == [
        ["trainer.lr=1e-3", "model.moe={num_experts: 4, top_k: 2}", "trainer.max_steps=5"],
        ["trainer.lr=1e-3", "model.moe=null", "trainer.max_steps=5"],
        ["trainer.lr=3e-3", "model.moe={num_experts: 4, top_k: 2}", "trainer.max_steps=5"],
        ["trainer.lr=3e-3", "model.moe=null", "trainer.max_steps=5"],
    ]
    assert [sweep_name("tiny", swept) for _, swept in combos] == [
        "tiny-lr=1e-3-moe=num_experts_4_top_k_2", "tiny-lr=1e-3-moe=null",
        "tiny-lr=3e-3-moe=num_experts_4_top_k_2", "tiny-lr=3e-3-moe=null",
    ]
    # Two swept keys with the same last part are named in full.
    _, swept = expand_sweep(["model.dropout=0,0.1", "data.dropout=0,0.2"])[0]
    assert swept == {"model.dropout": "0", "data.dropout": "0"}
    with pytest.raises(SpecError, match="nothing to sweep"):
        expand_sweep(["trainer.lr=1e-3"])
    with pytest.raises(SpecError, match="empty value"):
        expand_sweep(["trainer.lr=1e-3,"])


def _spec_file(tmp_path: Path, **sections) -> Path:
    # Paths need not exist: submit checks them on the cluster, not here.
    return write_config(tmp_path / "job.yaml", Path("/cluster/data"), Path("/cluster/runs"), **sections)


UNREACHABLE = "http://127.0.0.1:9"  # nothing listens there: an error about it means validation came too late


def test_submit_and_sweep_validate_the_spec_before_contacting_the_cluster(tmp_path, capsys):
    spec = _spec_file(tmp_path)
    assert main(["submit", str(spec), "trainer.zero_stag=0", "--address", UNREACHABLE]) == 2
    err = capsys.readouterr().err
    assert "trainer.zero_stag: unknown key; did you mean 'zero_stage'?" in err and "127.0.0.1:9" not in err

    # Every combination of a sweep is checked before the first job is submitted.
    assert main(["sweep", str(spec), "trainer.zero_stage=0,7", "--address", UNREACHABLE]) == 2
    err = capsys.readouterr().err
    assert "trainer.zero_stage" in err and "127.0.0.1:9" not in err

    # Relative paths would be read in the job's temporary folder on the cluster: refused, named.
    assert main(["submit", str(spec), "output.dir=runs", "data.tokenizer=data/stdlib/tokenizer.json",
                 "--address", UNREACHABLE]) == 2
    err = capsys.readouterr().err
    assert "output.dir 'runs'" in err and "data.tokenizer 'data/stdlib/tokenizer.json'" in err
    assert "data.sources.0.path '" not in err  # absolute: fine

    # A valid spec gets as far as the cluster, and the error says how to reach one.
    assert main(["submit", str(spec), "--address", UNREACHABLE]) == 2
    assert "cannot reach Ray's job server at http://127.0.0.1:9" in capsys.readouterr().err


@pytest.fixture
def fake_ray(tmp_path, monkeypatch) -> Path:
    """A `ray` first on PATH that records its arguments: `ray up` on a real file would start cloud
    machines. What is tested is zeroray's side: validate, then call Ray's launcher with the file."""
    calls = tmp_path / "ray_calls.txt"
    script = tmp_path / "bin" / "ray"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}:{os.environ['PATH']}")
    return calls


def test_cluster_up_validates_the_file_before_calling_ray(tmp_path, fake_ray, capsys):
    broken = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    broken["max_worker"] = broken.pop("max_workers")
    bad = tmp_path / "aws_typo.yaml"
    bad.write_text(yaml.safe_dump(broken))
    assert main(["cluster", "up", str(bad), "--yes"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "max_worker" in err and "did you mean 'max_workers'?" in err
    assert "Nothing was started" in err
    assert main(["cluster", "down", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: file not found" in capsys.readouterr().err
    assert not fake_ray.exists()  # Ray was never called

    aws = REPO / "cluster" / "aws.yaml"
    assert main(["cluster", "up", str(aws), "--yes"]) == 0
    assert main(["cluster", "status", str(aws)]) == 0
    assert fake_ray.read_text().splitlines() == [f"up {aws} --yes", f"exec {aws} ray status"]


def test_cluster_commands_on_kuberay_manifests_print_kubectl(tmp_path, fake_ray, capsys):
    rayjob = REPO / "cluster" / "kuberay" / "rayjob.yaml"
    assert main(["cluster", "status", str(rayjob)]) == 0
    out = capsys.readouterr().out
    assert "kubectl get rayjob zeroray-llama-1b" in out and "kubectl logs -f job/zeroray-llama-1b" in out
    assert main(["cluster", "up", str(REPO / "cluster" / "kuberay" / "raycluster.yaml")]) == 0
    assert "kubectl apply -f" in capsys.readouterr().out

    doc = yaml.safe_load(rayjob.read_text())
    doc["spec"]["shutdownAfterJobFinish"] = doc["spec"].pop("shutdownAfterJobFinishes")
    bad = tmp_path / "rayjob_typo.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert main(["cluster", "up", str(bad)]) == 2
    assert "unknown field spec.shutdownAfterJobFinish" in capsys.readouterr().err
    assert not fake_ray.exists()


# ---- a real Ray head with the job server ---------------------------------------------------


@dataclass(frozen=True)
class Head:
    address: str
    env: dict


def _stop_head(temp: Path) -> None:
    """Stop this head only. Not `ray stop`: it stops every Ray process of this user on the machine,
    other engineers' test clusters included. Every process of this head runs in `temp` (the cwd of
    `ray start`, which Ray's services and workers inherit; job drivers and their Ray Train workers run
    in working dirs under it) or names it on its command line."""

    def ours(p: psutil.Process) -> bool:
        try:
            return p.cwd().startswith(str(temp)) or any(str(temp) in arg for arg in p.cmdline())
        except psutil.Error:
            return False

    procs = [p for p in psutil.process_iter() if p.pid != os.getpid() and ours(p)]
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` with the dashboard (Ray's job server) and token authentication."""
    from ray._private.utils import get_dashboard_dependency_error

    missing = get_dashboard_dependency_error()
    if missing is not None:
        pytest.skip(f"Ray's job server (part of its dashboard) needs ray[default]; here: {missing}. "
                    f"pip install -c constraints.txt 'ray[default]'")
    temp = Path(tempfile.mkdtemp(prefix="zr-jobs-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    gcs, dashboard, agent, client = free_ports(4)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    # Jobs run `python` from the head's PATH: this venv, as on a cluster node whose venv is activated.
    env["PATH"] = f"{BIN}:{env['PATH']}"
    try:
        started = subprocess.run(
            [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=4", f"--temp-dir={temp}",
             "--include-dashboard=true", f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}"],
            cwd=temp, env=env, capture_output=True, text=True, timeout=180,
        )
        assert started.returncode == 0, started.stderr[-3000:]
        yield Head(f"http://127.0.0.1:{dashboard}", env)
    finally:
        _stop_head(temp)
        shutil.rmtree(temp, ignore_errors=True)


def start(head: Head, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "zeroray"), *args, "--address", head.address], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or head.env)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def zeroray(head: Head, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return finish(start(head, *args, env=env))


@pytest.mark.slow
def test_submit_sweep_status_logs_stop_on_a_real_head(ray_head, small_corpus, tmp_path):
    runs = tmp_path / "runs"
    spec = write_config(tmp_path / "job.yaml", small_corpus, runs, cluster={"workers": 1},
                        trainer={"zero_stage": 0, "max_steps": 12, "warmup_steps": 1, "checkpoint_every": 0})
    out, err = (tmp_path / "submit.out").open("w"), (tmp_path / "submit.err").open("w")
    # Waits for the job and streams its output; the override travels to the cluster with the spec.
    submit = subprocess.Popen([str(BIN / "zeroray"), "submit", str(spec), "trainer.max_steps=3",
                               "--address", ray_head.address], stdout=out, stderr=err, env=ray_head.env)
    try:
        # Meanwhile: a sweep queues one job per value, each with its own run name …
        sweep = zeroray(ray_head, "sweep", str(spec), "trainer.lr=1e-3,2e-3", "--name", "sw")
        assert sweep.returncode == 0, sweep.stderr[-2000:]
        lines = [line.split() for line in sweep.stdout.splitlines()]
        assert [name for _, name in lines] == ["sw-lr=1e-3", "sw-lr=2e-3"]
        swept = [job for job, _ in lines]
        # … a second job for a run that a job is training is refused …
        busy = zeroray(ray_head, "submit", str(spec), "--name", "sw-lr=1e-3", "--no-wait")
        assert busy.returncode == 2 and f"job {swept[0]}" in busy.stderr and "already trains run" in busy.stderr
        # … and `zeroray stop` ends both sweep jobs before they train (to save time).
        stops = [start(ray_head, "stop", job) for job in swept]
        for job, stopped in zip(swept, map(finish, stops), strict=True):
            assert stopped.returncode == 0 and stopped.stdout.strip() == f"job {job}: STOPPED", stopped.stdout
        assert submit.wait(timeout=420) == 0, (tmp_path / "submit.err").read_text()[-3000:]
    finally:
        if submit.poll() is None:
            submit.kill()
        out.close()
        err.close()
    job = (tmp_path / "submit.out").read_text().splitlines()[0]
    assert f"job {job} SUCCEEDED" in (tmp_path / "submit.err").read_text()
    assert "zeroray: training finished" in (tmp_path / "submit.out").read_text()  # the job's output, streamed
    steps = [json.loads(line)["step"] for line in (runs / "job" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]

    # Four commands at once (each one starts Python and imports Ray: seconds).
    table, detail, logs, denied = [finish(p) for p in [
        start(ray_head, "status"), start(ray_head, "status", swept[1]), start(ray_head, "logs", job),
        # Token authentication: a wrong token is refused, and the message says which variables to set.
        start(ray_head, "status", env={**ray_head.env, "RAY_AUTH_TOKEN": "not-the-token"}),
    ]]
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split()[1:3] for line in table.stdout.splitlines()[1:]}
    assert rows == {job: ["job", "SUCCEEDED"], swept[0]: ["sw-lr=1e-3", "STOPPED"],
                    swept[1]: ["sw-lr=2e-3", "STOPPED"]}
    assert f"run      sw-lr=2e-3  ({runs / 'sw-lr=2e-3'})" in detail.stdout
    assert f"config   {spec} trainer.lr=2e-3" in detail.stdout
    assert logs.returncode == 0 and "zeroray: training finished" in logs.stdout
    assert denied.returncode == 2 and "RAY_AUTH_TOKEN" in denied.stderr, denied.stderr
