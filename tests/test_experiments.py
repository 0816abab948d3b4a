"""`zeroray experiment`: every experiment's plan is a set of valid, fair run specs; the table comes
from the runs' metrics (mean ± std over seeds, Δ to the baseline, the paper's direction); one
2-arm smoke experiment runs end to end on Ray; the CLI's --dry-run prints the plan."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import experiments as ex
from trainer.errors import SpecError, ZerorayError
from trainer.spec import load_spec

ZERORAY = shutil.which("zeroray", path=str(Path(sys.executable).parent)) or "zeroray"


@pytest.fixture
def in_checkout(tmp_path, small_corpus, monkeypatch) -> Path:
    """A working folder laid out like a checkout after `zeroray data prepare`: the configs' relative
    data/stdlib paths lead to the small test corpus."""
    stdlib = tmp_path / "work" / "data" / "stdlib"
    stdlib.mkdir(parents=True)
    for name in ("train", "val", "tokenizer.json"):
        (stdlib / name).symlink_to(small_corpus / name)
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "work"


@pytest.mark.parametrize("name", ex.names())
def test_every_experiment_plans_fair_valid_specs_at_every_scale(name, in_checkout):
    experiment = ex.load_experiment(name)
    assert set(experiment.scales) == set(ex.SCALES)
    for scale in experiment.scales:
        p = ex.plan(experiment, scale, seeds=2, out=in_checkout / "exp")
        assert len(p.runs) == 2 * len(experiment.arms)
        assert len({r.run_dir for r in p.runs}) == len(p.runs)
        assert {r.spec.trainer.seed for r in p.runs} == {0, 1}
        for run in p.runs:  # the same held-out data for all, made absolute like data.sources
            assert [s.path for s in run.spec.eval.sources] == [str((in_checkout / ex.HELD_OUT).resolve())]
            assert run.spec.eval.every == experiment.scales[scale].eval_every
            assert run.spec.data == p.runs[0].spec.data  # data.seed included: same data for every arm and seed
        models_ = [p.runs_of(arm.name)[0].spec.model for arm in experiment.arms]
        assert len({m.model_dump_json() for m in models_}) == len(models_), "two arms train the same model"


def test_an_arm_of_another_family_keeps_the_shapes(in_checkout):
    """`model.name=bert` on the ConvBERT config is configs/bert_tiny.yaml's model; `model.name=llama`
    on the hyper-connection config is its decoder without hyper-connections."""
    convbert = ex.plan(ex.load_experiment("convbert"), "tiny", 1, in_checkout / "c")
    bert_tiny = load_spec(ex.configs_dir() / "bert_tiny.yaml", ["model.pretraining=mlm"])
    assert convbert.runs_of("bert")[0].spec.model == bert_tiny.model
    assert convbert.runs_of("convbert")[0].spec.model.pretraining == "mlm"
    hc = ex.plan(ex.load_experiment("hyper-connections"), "tiny", 1, in_checkout / "h")
    residual, dhc4 = (hc.runs_of(a)[0].spec.model for a in ("residual", "dhc4"))
    assert residual.name == "llama" and dhc4.name == "hc_llm"
    shared = {k: v for k, v in dhc4.model_dump().items() if k not in ("name", "rate", "dynamic", "connection", "sinkhorn_iters")}
    assert residual.model_dump() == {**shared, "name": "llama"}


def test_bad_overrides_and_unfair_arms_are_refused_by_name(in_checkout):
    hc = ex.load_experiment("hyper-connections")
    with pytest.raises(SpecError, match=r"(?s)arm residual.*model.rate: unknown key"):
        ex.plan(hc, "tiny", 1, in_checkout / "x", ("model.rate=2",))
    with pytest.raises(SpecError, match=r"trainer.lerning_rate: unknown key"):
        ex.plan(hc, "tiny", 1, in_checkout / "x", ("trainer.lerning_rate=1",))
    unfair = hc.model_copy(update={"arms": (hc.arms[0], hc.arms[1].model_copy(update={"overrides": (
        *hc.arms[1].overrides, "trainer.lr=1e-2")}))})
    with pytest.raises(ZerorayError, match=r"arm shc4 differs from arm residual outside the model \(trainer.lr\)"):
        ex.plan(unfair, "tiny", 1, in_checkout / "x")
    with pytest.raises(ZerorayError, match="no experiment 'nope'; experiments: charformer, convbert"):
        ex.load_experiment("nope")
    with pytest.raises(ValueError, match="baseline names arm 'dense'; the arms are residual"):
        ex.Experiment.model_validate({**hc.model_dump(), "baseline": "dense"})


def write_run(run: ex.PlannedRun, eval_losses: list[float], speeds: list[float]) -> None:
    """A run directory as a finished run leaves it: spec, status, one record per logged step."""
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "spec.yaml").write_text(run.spec.to_yaml())
    (run.run_dir / "status.json").write_text(json.dumps({"status": "finished", "started": 100.0, "updated": 160.0}))
    every = run.spec.eval.every
    records = []
    for i, speed in enumerate(speeds):  # steps 1, every, 2·every, …; evaluated from the second record on
        record = {"step": 1 if i == 0 else every * i, "loss": 5.0 - i, "tokens_per_s": speed}
        if i:
            record["eval/loss"] = eval_losses[i - 1]
        records.append(record)
    (run.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_table_means_spreads_and_the_papers_direction_from_metrics_files(in_checkout):
    p = ex.plan(ex.load_experiment("hyper-connections"), "smoke", 2, in_checkout / "exp")
    final = {"residual": (3.00, 3.02), "shc4": (3.00, 3.04), "dhc4": (2.90, 2.92), "mhc4": (2.90, 2.92),
             "dhc1": (3.05, 3.07)}
    for run in p.runs:
        loss = final[run.arm.name][run.seed]
        # Step 1's throughput includes the start-up and is left out of the median.
        write_run(run, [loss + 2, loss + 1, loss], [10.0, 1000.0 + run.seed, 1100.0, 1200.0 + 100 * run.seed])
    results = ex.collect(p)
    arms = results["arms"]
    residual = arms["residual"]["summary"]["eval_loss"]
    assert residual["mean"] == pytest.approx(3.01) and residual["std"] == pytest.approx(0.0141421, rel=1e-4)
    assert arms["residual"]["summary"]["tokens_per_s"]["values"] == [1100.0, 1100.0]  # median of 1000, 1100, 1200
    dhc4 = arms["dhc4"]["vs_baseline"]["eval_loss"]
    assert dhc4["delta"] == pytest.approx(-0.1) and dhc4["beyond_spread"] is True
    shc4 = arms["shc4"]["vs_baseline"]["eval_loss"]
    assert shc4["delta"] == pytest.approx(0.01) and shc4["beyond_spread"] is False  # spread 0.014 + 0.028
    params = arms["dhc4"]["vs_baseline"]["params"]
    assert params["delta"] > 0 and params["spread"] == 0 and params["beyond_spread"] is True  # exact: no seed noise
    verdicts = [x["verdict"] for x in results["expectations"]]
    assert verdicts == ["disagrees (within the seed spread)", "agrees (beyond the seed spread)",
                        "agrees (beyond the seed spread)", "agrees (beyond the seed spread)",
                        "agrees (within the seed spread)", "agrees (beyond the seed spread)"]
    run = arms["dhc4"]["runs"][0]
    assert run["curve"] == [[s * p.runs[0].spec.tokens_per_step, v] for s, v in ((3, 4.9), (6, 3.9), (9, 2.9))]
    assert run["wall_s"] == 60.0 and run["status"] == "finished" and run["eval_step"] == 9

    ex.write_results(results, p.out)
    table = (p.out / "results.md").read_text()
    assert "| **residual** (baseline): Pre-Norm residual connections (llama) |" in table
    assert "3.0100 ± 0.0141" in table and "| 2.811 |" in table
    assert "| -0.1000 (-3.3%), beyond spread |" in table
    assert json.loads((p.out / "results.json").read_text())["expectations"][1]["verdict"].startswith("agrees")
    assert (p.out / "eval_loss.png").stat().st_size > 10_000


def test_one_seed_leaves_the_spread_unknown():
    one = ex.summarise([2.5])
    assert one["std"] is None
    c = ex.compare("eval_loss", one, ex.summarise([2.6]))
    assert c["beyond_spread"] is None and ex.verdict("lower", c) == "agrees (seed spread unknown: 1 seed)"
    assert ex.verdict("not_higher", ex.compare("eval_loss", ex.summarise([2.7, 2.9]), ex.summarise([2.6, 2.8]))) \
        == "agrees (within the seed spread)"


def test_dry_run_prints_the_plan(in_checkout):
    proc = subprocess.run([ZERORAY, "experiment", "charformer", "--dry-run", "--seeds", "3", "trainer.lr=1e-3"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "240 steps × 16 sequences × 256 tokens = 983,040 tokens (bytes, span_corruption)" in out
    assert "seeds: 3 (trainer.seed 0..2" in out and "runs: 9 in" in out and "trainer.lr=1e-3" in out
    assert "- bytes (baseline): byte-level encoder–decoder, no GBST" in out
    assert "overrides: model.gbst=false model.downsample=1" in out
    assert not (in_checkout / "runs").exists()  # nothing trained, nothing written


def test_a_run_saved_by_an_older_zeroray_is_still_the_same_plan(in_checkout):
    """A spec saved before a key existed (here trainer.compile, at its default) counts as finished; a
    changed value is refused by section."""
    import yaml

    from tests.test_checkpoint import publish

    run = ex.plan(ex.load_experiment("convbert"), "smoke", 1, in_checkout / "exp").runs[0]
    saved = run.spec.to_dict()
    del saved["trainer"]["compile"]
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "spec.yaml").write_text(yaml.safe_dump(saved))
    publish(run.run_dir / "checkpoints", run.spec.trainer.max_steps)
    assert ex.run_state(run) == "finished"
    # How fast the data is read is not what the run is (trainer.run_prep's rule for a relaunch): a run saved
    # with another data.loader_workers, as every run before 1-core workers read in-process, is the same.
    saved["data"]["loader_workers"] = run.spec.data.loader_workers + 1
    (run.run_dir / "spec.yaml").write_text(yaml.safe_dump(saved))
    assert ex.run_state(run) == "finished"
    saved["trainer"]["lr"] *= 2
    (run.run_dir / "spec.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ZerorayError, match="with another trainer section"):
        ex.run_state(run)
