"""Fault tolerance with real Ray, real DeepSpeed and real signals: ranks killed with SIGKILL, a driver
preempted with SIGTERM, nodes of a (simulated) multi-node cluster lost and added back. Every interrupted
run must reproduce the losses of one uninterrupted run from wherever it resumed. The fast tests at the
end check the pieces without Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

from cluster.local import scaling_config
from cluster.simulated import SimulatedCluster
from launcher.driver_stop import DriverStop
from launcher.ray_launch import launch
from tests.conftest import REPO, write_config
from trainer.checkpoint import Checkpoint, CheckpointError, CheckpointStore
from trainer.config import DebugConfig
from trainer.errors import SpecError
from trainer.failure_injection import InjectedFailure, after_step
from trainer.preemption import StopAgreement
from trainer.spec import load_spec
from trainer.storage import STOP_FILE

STEPS = 16
# fp32 so that a resumed step computes exactly what the uninterrupted one did.
BASE = ["trainer.precision=fp32", f"trainer.max_steps={STEPS}", "trainer.warmup_steps=2", "trainer.checkpoint_every=4",
        "output.keep_last=8"]


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_same_losses(recs: list[dict], reference: dict[int, float], rel: float) -> None:
    for r in recs:
        assert r["loss"] == pytest.approx(reference[r["step"]], rel=rel), f"step {r['step']}"


class Driver:
    """`zeroray train` in a child process, its output in a file (a pipe nobody reads would fill up and
    block it)."""

    def __init__(self, config: Path, overrides: list[str], env: dict, log: Path):
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "train", str(config), *overrides],
                                         cwd=REPO, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 400) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"zeroray did not finish within {timeout} s:\n{self.output()[-3000:]}")

    def wait_for(self, condition, what: str, timeout: float = 400):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.proc.poll() is not None:
                pytest.fail(f"zeroray exited ({self.proc.returncode}) before {what}:\n{self.output()[-3000:]}")
            time.sleep(0.3)
        self.proc.kill()
        pytest.fail(f"timed out waiting for {what}:\n{self.output()[-3000:]}")


@pytest.fixture
def short_tmp():
    """For Ray's temp folder: its socket paths have a length limit that pytest's tmp_path can exceed."""
    folder = tempfile.mkdtemp(prefix="zr-ft-", dir="/tmp")
    yield Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def fault_config(tmp_path_factory, small_corpus) -> Path:
    folder = tmp_path_factory.mktemp("faults")
    return write_config(folder / "faults.yaml", small_corpus, folder / "runs")


@pytest.fixture(scope="module")
def reference(ray_local, fault_config) -> dict[int, float]:
    """Per-step losses of the uninterrupted run (2 workers)."""
    run = launch(load_spec(fault_config, [*BASE, "output.name=reference"]), announce=lambda s: None).run.root
    losses = {r["step"]: r["loss"] for r in records(run)}
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


@pytest.mark.slow
def test_two_kills_and_a_preemption_lose_no_step(ray_local, fault_config, reference, short_tmp):
    """One run, three interruptions (one run: each Ray launch costs tens of seconds here).
    kill -9 of rank 0 after steps 6 and 11, checkpoints every 4: Ray Train restarts the workers by itself
    (trainer.max_failures=2), each time from the latest checkpoint. Then SIGTERM to `zeroray train`: the
    workers checkpoint at the next step boundary, the run stops as `preempted` and says how to resume,
    and the next launch continues there. Every step, redone or not, has the uninterrupted run's loss."""
    run = fault_config.parent / "runs" / "interrupted"
    driver = Driver(fault_config, [*BASE, "output.name=interrupted", "trainer.max_failures=2",
                                   "debug.fail_at_steps=[6, 11]", "debug.fail_rank=0", "debug.fail_mode=kill",
                                   "debug.step_delay_s=1"],  # time for the signal to land before the end
                    {"RAY_TMPDIR": str(short_tmp)}, short_tmp / "driver.log")
    driver.wait_for(lambda: any(r["step"] >= 12 for r in records(run)), "step 12, after both restarts")
    signalled_at, step_at_signal = time.time(), records(run)[-1]["step"]
    driver.proc.send_signal(signal.SIGTERM)
    assert driver.wait() == 143  # 128 + SIGTERM: stopped on request, with a checkpoint
    exited_at = time.time()
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "preempted"
    assert f"zeroray resume {run}" in status["message"] and f"zeroray resume {run}" in driver.output()
    stopped = CheckpointStore(run / "checkpoints", 0, 1).latest().step
    first = records(run)
    assert 12 <= stopped < STEPS and first[-1]["step"] == stopped, "a checkpoint of the last step, then stop"
    assert not (run / STOP_FILE).exists()
    # steps 5-6 and 9-11 are redone after the kills: the metrics file shows them twice
    assert [r["step"] for r in first] == [*range(1, 7), *range(5, 12), *range(9, stopped + 1)]
    markers = sorted(run.glob("injected_failure_step_*.json"))
    assert [json.loads(m.read_text())["step"] for m in markers] == [6, 11], "both kills happened"

    again = launch(load_spec(fault_config, [*BASE, "output.name=interrupted"]), announce=lambda s: None)
    resumed = records(run)[len(first):]
    assert [r["step"] for r in resumed] == list(range(stopped + 1, STEPS + 1)), "no step redone"
    assert_same_losses(first + resumed, reference, rel=1e-5)
    assert again.last["step"] == STEPS
    assert json.loads((run / "status.json").read_text())["status"] == "finished"

    for marker in markers:  # the figures docs/fault_tolerance.md quotes (pytest -s shows them)
        killed = json.loads(marker.read_text())
        first_after = next(r for r in first if r["time"] > killed["time"])
        print(f"\nkill -9 after step {killed['step']}: {killed['step'] - first_after['step'] + 1} step(s) redone, "
              f"{first_after['time'] - killed['time']:.1f} s from the kill to the next step record")
    print(f"SIGTERM after step {step_at_signal}: stopped after step {stopped} (with its checkpoint), the driver "
          f"exited {exited_at - signalled_at:.1f} s after the signal")
    print(f"final loss after two failures and a preemption {again.last['loss']:.6f}, uninterrupted "
          f"{reference[STEPS]:.6f}, difference {again.last['loss'] - reference[STEPS]:.2e}")


def attempts(run: Path) -> list[tuple[float, dict[int, str]]]:
    """Each start of the workers, in order: (time, rank → Ray node id), from the per-rank placement files."""
    lines = sorted((json.loads(line) for f in (run / "logs").glob("placement_rank_*.jsonl")
                    for line in f.read_text().splitlines()), key=lambda p: p["time"])
    starts: list[tuple[float, int, dict[int, str]]] = []
    for p in lines:
        if not starts or starts[-1][1] != p["world"] or p["rank"] in starts[-1][2]:
            starts.append((p["time"], p["world"], {}))
        starts[-1][2][p["rank"]] = p["node_id"]
    return [(start, nodes) for start, _, nodes in starts]


@pytest.mark.slow
def test_elastic_run_follows_the_nodes_of_the_cluster(fault_config, reference, short_tmp):
    """cluster.workers [1, 2], spread, on a head + two worker nodes (2 CPUs and 1 CPU): one worker per
    node; when the 2-CPU node is lost the run continues on 1 worker from the latest checkpoint, and when
    a node joins again Ray Train grows it back to 2. Losses stay those of the fixed 2-worker run. Once
    it trains on 2 workers again the test stops it with SIGTERM (the rest would only take time)."""
    run = fault_config.parent / "runs" / "elastic"
    with SimulatedCluster([2, 1], str(short_tmp)) as sim:
        big, small = sim.node_ids
        # Checkpoints every 2 steps (the losses do not depend on it) and 3 s per step: the 1-worker part
        # must outlast Ray Train noticing the new node (its resource view refreshes every 20 s).
        driver = Driver(fault_config, [
            *BASE, "output.name=elastic", "trainer.checkpoint_every=2", "output.keep_last=3",
            "cluster.workers=[1, 2]", "trainer.global_batch_size=8", "cluster.placement=spread",
            "cluster.resize_check_s=2", "trainer.max_failures=1", "debug.step_delay_s=3",
            f"cluster.address={sim.address}",
        ], {"RAY_TMPDIR": str(short_tmp),
            # After a node is lost Ray Train first asks again for the old size (its view is stale) and waits
            # this long (60 s by default) before asking for what is left.
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}, short_tmp / "driver.log")
        driver.wait_for(lambda: any(r["step"] >= 3 for r in records(run)), "step 3 on 2 workers")
        sim.remove(big)
        removed_at = time.time()
        driver.wait_for(lambda: len(attempts(run)) == 2 and records(run)[-1]["time"] > attempts(run)[1][0],
                        "a step on 1 worker")
        sim.add(1)
        added_at = time.time()
        driver.wait_for(lambda: len(attempts(run)) == 3 and records(run)[-1]["time"] > attempts(run)[2][0],
                        "a step on 2 workers again")
        driver.proc.send_signal(signal.SIGTERM)
        assert driver.wait() != 0 and "Resume with" in driver.output()
    starts = [nodes for _, nodes in attempts(run)]
    assert [len(nodes) for nodes in starts] == [2, 1, 2], starts
    assert starts[0][0] != starts[0][1], "spread: one worker per node"
    assert starts[1] == {0: small} and big not in starts[2].values()
    recs = records(run)
    assert_same_losses(recs, reference, rel=1e-4)
    assert not (run / "checkpoints" / "universal").exists(), "the conversions are removed once loaded"
    for event, at, start in (("node lost", removed_at, 1), ("node added", added_at, 2)):
        resumed = next(r for r in recs if r["time"] > attempts(run)[start][0])
        before = max(r["step"] for r in recs if r["time"] < attempts(run)[start][0])
        print(f"\n{event}: {resumed['time'] - at:.1f} s to the next step record on {len(starts[start])} "
              f"worker(s), {before - resumed['step'] + 1} step(s) redone")
    assert json.loads((run / "status.json").read_text())["status"] == "preempted"


# ---- the pieces, without Ray ---------------------------------------------------------------------


def test_a_range_of_workers_needs_a_global_batch_that_every_count_keeps(tiny_config):
    spec = load_spec(tiny_config, ["cluster.workers=[1, 2]", "trainer.global_batch_size=8"])
    assert spec.global_batch_size == 8
    assert [(s.cluster.workers, s.trainer.grad_accum_steps) for s in map(spec.sized_for, (1, 2))] == [(1, 2), (2, 1)]
    with pytest.raises(SpecError, match=r"set trainer.global_batch_size.*\(a multiple of 8\)"):
        load_spec(tiny_config, ["cluster.workers=[1, 2]"])
    with pytest.raises(SpecError, match=r"\(8\) is not a multiple of .* for 3 worker\(s\). Use a multiple of 24"):
        load_spec(tiny_config, ["cluster.workers=[1, 3]", "trainer.global_batch_size=8"])
    with pytest.raises(SpecError, match=r"on 3 worker\(s\): data.streams \(4\) must be a multiple of the worker"):
        load_spec(tiny_config, ["cluster.workers=[1, 3]", "trainer.global_batch_size=24"])
    with pytest.raises(SpecError, match="minimum must not exceed the maximum; write \\[1, 2\\]"):
        load_spec(tiny_config, ["cluster.workers=[2, 1]"])
    assert load_spec(tiny_config, ["cluster.workers=[2, 2]"]).cluster.workers == 2
    # Ranges no global batch keeps (the multiple of [1, 64] has 28 digits), and a typo's worker count.
    with pytest.raises(SpecError, match=r"for 3, 4, 5, 6, 7, 8, 9, 10 and 54 more worker\(s\). No global "
                       r"batch of practical size suits every count: narrow the range"):
        load_spec(tiny_config, ["cluster.workers=[1, 64]", "trainer.global_batch_size=8"])
    with pytest.raises(SpecError, match=r"cluster.workers.*100000000000000000000 workers: at most 1,000,000"):
        load_spec(tiny_config, ["cluster.workers=[1, 100000000000000000000]"])


def test_resuming_on_another_fixed_worker_count_names_the_accumulation_that_fits(tiny_config, tmp_path):
    from trainer.resume import check_resumable

    saved = load_spec(tiny_config)  # 2 workers × 4 rows
    (tmp_path / "spec.yaml").write_text(saved.to_yaml())
    ckpt = Checkpoint(tmp_path, 4, world_size=2)
    with pytest.raises(CheckpointError, match="set trainer.grad_accum_steps=2"):
        check_resumable(ckpt, load_spec(tiny_config, ["cluster.workers=1"]), world=1)
    check_resumable(ckpt, load_spec(tiny_config, ["cluster.workers=1", "trainer.grad_accum_steps=2"]), world=1)


def test_injected_failures_happen_once(tmp_path):
    debug = DebugConfig(fail_at_steps=(3,), fail_rank=1, fail_mode="raise")
    after_step(debug, 3, 0, tmp_path)  # another rank
    after_step(debug, 2, 1, tmp_path)  # another step
    with pytest.raises(InjectedFailure, match="rank 1 after step 3"):
        after_step(debug, 3, 1, tmp_path)
    assert json.loads((tmp_path / "injected_failure_step_00000003.json").read_text())["rank"] == 1
    after_step(debug, 3, 1, tmp_path)  # the restarted run goes on


def test_sigterm_to_the_driver_becomes_a_stop_request_that_all_ranks_agree_on(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with DriverStop(tmp_path, grace_s=60, announce=lambda s: None) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while stop.requested is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the handler runs between bytecodes of this (main) thread
        assert "SIGTERM to the driver" in json.loads((tmp_path / STOP_FILE).read_text())["reason"]
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            agreement = StopAgreement(tmp_path, rank=0)
            assert agreement.agreed() and "SIGTERM to the driver" in agreement.local_reason()
            agreement.served()
            assert not agreement.agreed()
        finally:
            dist.destroy_process_group()
    assert signal.getsignal(signal.SIGTERM) == before, "the previous handler is back"
    assert not (tmp_path / STOP_FILE).exists()
    latest = Checkpoint(tmp_path / "step_00000007", 7, 2)
    assert "after step 7" in stop.stopped_early(latest, max_steps=10) and f"zeroray resume {tmp_path}" in \
        stop.stopped_early(latest, max_steps=10)
    assert stop.stopped_early(Checkpoint(tmp_path, 10, 2), max_steps=10) is None, "it had finished anyway"


def test_the_cluster_section_becomes_ray_trains_scaling_config(tiny_config):
    spec = load_spec(tiny_config, ["cluster.workers=[1, 2]", "trainer.global_batch_size=8",
                                   "cluster.resources_per_worker={slot: 1}", "cluster.placement=spread"])
    scaling = scaling_config(spec.cluster)
    assert scaling.elasticity_enabled and (scaling.min_workers, scaling.max_workers) == (1, 2)
    assert scaling.placement_strategy == "SPREAD" and scaling.resources_per_worker == {"CPU": 1, "slot": 1.0}
    assert scaling_config(load_spec(tiny_config).cluster).placement_strategy == "PACK"
    assert yaml.safe_load(spec.to_yaml())["cluster"]["workers"] == [1, 2], "the range survives the saved spec"


# ---- drained nodes (Ray's preemption notice) -------------------------------------------------------


def drain(address: str, node_id: str, deadline_s: float) -> float:
    """Drain a node through Ray's own path (the GCS call `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION
    --deadline-remaining-seconds …` makes); returns when it was asked. Nothing kills the node: the cloud would."""
    import ray
    from ray.core.generated import autoscaler_pb2

    asked = time.time()
    accepted, why = ray._raylet.GcsClient(address=address).drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), "tests/test_faults.py",
        int((asked + deadline_s) * 1000))
    assert accepted, why
    return asked


def checkpoint_notes(run: Path) -> dict:
    try:
        return json.loads((run / "status.json").read_text()).get("checkpoints") or {}
    except (OSError, ValueError):
        return {}


def noted(run: Path, kind: str) -> list[dict]:
    return [e for e in checkpoint_notes(run).get("events", []) if e["event"] == kind]


@pytest.mark.slow
def test_a_drained_node_is_checkpointed_at_the_step_reached_and_the_run_moves_on(fault_config, reference, short_tmp):
    """cluster.workers [1, 2] spread over three 1-CPU nodes, trainer.max_failures=0, every publication 3 s
    slower than it is (debug.checkpoint_delay_s). A node hosting a rank is drained with a 10 s deadline: the
    ranks checkpoint the step they reached, wait, and Ray Train restarts them on the two nodes left, from that
    checkpoint: no step trained again, and no failure counted. Then one of the new nodes is drained, and while
    that drain checkpoint is being published the other is drained with no time left (a second preemption):
    Ray tears the workers down mid-publication, the checkpoint before stays `latest`, status.json says what
    happened, and the run resumes from it on two fresh nodes. Every loss is the uninterrupted run's."""
    run = fault_config.parent / "runs" / "drained"
    with SimulatedCluster([1, 1, 1], str(short_tmp)) as sim:
        driver = Driver(fault_config, [
            *BASE, "output.name=drained", "trainer.checkpoint_every=8", "cluster.workers=[1, 2]",
            "trainer.global_batch_size=8", "cluster.placement=spread", "trainer.max_failures=0",
            "debug.step_delay_s=0.5", "debug.checkpoint_delay_s=3", f"cluster.address={sim.address}",
        ], {"RAY_TMPDIR": str(short_tmp), "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10",
            "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"},
            short_tmp / "driver.log")
        driver.wait_for(lambda: any(r["step"] >= 3 for r in records(run)), "step 3")
        first, at_drain = attempts(run)[0][1], records(run)[-1]["step"]
        drained_at = drain(sim.address, first[1], deadline_s=10)
        driver.wait_for(lambda: noted(run, "drain_checkpoint"), "the drain checkpoint")
        reached = noted(run, "drain_checkpoint")[0]
        driver.wait_for(lambda: len(attempts(run)) == 2 and records(run)[-1]["time"] > attempts(run)[1][0],
                        "a step after the restart")
        second = attempts(run)[1][1]
        sim.remove(first[1])  # the cloud takes the drained node at its deadline
        driver.wait_for(lambda: records(run)[-1]["step"] >= reached["step"] + 2, "two steps more")
        drain(sim.address, second[0], deadline_s=15)
        driver.wait_for(lambda: (checkpoint_notes(run).get("in_progress") or {}).get("reason") == "drain",
                        "the second drain checkpoint under way")
        cut = checkpoint_notes(run)["in_progress"]["step"]
        drain(sim.address, second[1], deadline_s=0)  # a second preemption, due now
        fresh = {sim.add(1), sim.add(1)}
        assert driver.wait() == 0, driver.output()[-3000:]
    starts = [nodes for _, nodes in attempts(run)]
    assert len(starts) == 3 and first[1] not in starts[1].values() and set(starts[2].values()) == fresh, starts
    s1 = reached["step"]
    assert [r["step"] for r in records(run)] == [*range(1, s1 + 1), *range(s1 + 1, cut + 1), *range(s1 + 1, STEPS + 1)]
    assert_same_losses(records(run), reference, rel=1e-5)
    interrupted = noted(run, "checkpoint_interrupted")
    assert [(e["step"], e["reason"]) for e in interrupted] == [(cut, "drain")], interrupted
    assert f"resuming from step_{s1:08d}" in interrupted[0]["message"]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "finished" and status["checkpoints"]["latest"]["step"] == STEPS
    log = (run / "logs" / "rank_0.log").read_text()
    assert "drain notice after step" in log and f"drain checkpoint of step {s1} published" in log
    restart = attempts(run)[1][0]
    print(f"\ndrain with a 10 s deadline after step {at_drain}: checkpoint of step {s1} published "
          f"{reached['published_at'] - drained_at:.1f} s after the drain call ({reached['published_at'] - reached['notice_at']:.1f} s "
          f"after the notice reached the ranks), 0 steps trained again; workers restarted "
          f"{restart - drained_at:.1f} s after the drain call, next step "
          f"{next(r for r in records(run) if r['time'] > restart)['time'] - drained_at:.1f} s after it")
