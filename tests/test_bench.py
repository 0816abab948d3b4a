"""`zeroray bench`: the ZeRO paper's memory formulas, targets and the table from a results dict, and one
real sitting of the memory section (torchrun, 2 ranks, DeepSpeed ZeRO 0–3)."""

from __future__ import annotations

import datetime
import json

import pytest

from launcher.bench_cmd import bench_module, parse_sections
from trainer.errors import ZerorayError

zero_memory = bench_module("zero_memory")
suite = bench_module("suite")
results_table = bench_module("results_table")


@pytest.mark.parametrize("params, ranks", [(1000, 1), (5_310_720, 2), (7, 8)])
def test_paper_formulas_per_stage(params, ranks):
    psi, n = params, ranks
    expected = {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}
    for stage, total in expected.items():
        got = zero_memory.paper_bytes(psi, stage, n)
        assert got["total"] == pytest.approx(total)
        assert got["params"] + got["grads"] + got["optimizer"] == pytest.approx(total)
    # Partitioning only ever removes bytes, and one rank holds everything at every stage.
    totals = [zero_memory.paper_bytes(psi, s, n)["total"] for s in range(4)]
    assert totals == sorted(totals, reverse=True)
    if n == 1:
        assert len(set(totals)) == 1
    with pytest.raises(ValueError, match="stage"):
        zero_memory.paper_bytes(psi, 4, n)


def _results() -> dict:
    """A results dict as `suite.run` returns it (figures made up, shapes real)."""
    mem_rows = []
    for stage in range(4):
        paper = zero_memory.paper_bytes(1_000_000, stage, 2)
        measured = {**{k: v * (1.2 if stage == 3 else 1.0) for k, v in paper.items()}, "buffers": 0}
        mem_rows.append({
            "stage": stage, "optimizer_class": "X", "precision": "bf16", "measured": measured,
            "measured_tensor_bytes": measured, "paper": paper, "ratio": measured["total"] / paper["total"],
            "by_attribute": {}, "kept_whole": {}, "peak_rss_bytes": [9e8, 9e8],
            "rss_before_bytes": [6e8, 6e8],
        })
    arm = {"arm": "llama", "label": "llama (residual, dense)", "config": "demo.yaml", "params": 5e6,
           "active_params": 5e6, "flops_per_token": 3.5e7, "step_s": 0.8, "tokens_per_s": 2500.0,
           "flop_per_s": 8.75e10, "mfu": 0.43, "peak_rss_growth_bytes": 3e8}
    overhead_row = {"stage": 2, "zeroray_tokens_per_s": 4200.0, "handwritten_tokens_per_s": 4500.0,
                    "ratio": 0.95, "precision": "bf16"}
    mfu_row = {"run": "llama_100m", "config": "llama_100m.yaml", "params": 9.1e7, "flops_per_token": 6.6e8,
               "tokens_per_s": 200.0, "flop_per_s": 1.32e11, "dtype": "bfloat16", "peak_flop_per_s": 3.3e11,
               "mfu": 0.40}
    results = {
        "date": "2026-11-22T12:00:00", "mode": "quick", "machine": "x86_64", "cpus": 2,
        "versions": {"torch": "2.13"}, "sections": list(suite.SECTIONS),
        "errors": {"scaling": "RuntimeError: worker died\ntraceback…"},
        "overhead": {"config": "demo.yaml", "workers": 2, "threads_per_worker": 1, "micro_batch_size": 8,
                     "steps": 12, "warmup": 4, "rows": [overhead_row]},
        "mfu": {"rows": [mfu_row]},
        "memory": {"config": "demo.yaml", "ranks": 2, "params": 1_000_000, "rows": mem_rows,
                   "notes": ["a note"]},
        "models": {"threads": 1, "bf16_peak_flop_per_s": 2e11, "rows": [arm]},
        "hc": {"dhc4_over_residual": 1.69, "shc4_over_residual": 1.21},
        "moe": {"top2of8_over_dense": 1.19},
        "startup": {"command": "zeroray train configs/demo.yaml", "first_step_s": 18.0,
                    "phases": [{"phase": "Ray: embedded cluster start (ray.init)", "seconds": 4.0}]},
        "pipeline": {"batches": 150, "tokens_per_batch": 2048, "loader_workers": 1,
                     "runs": {"zeroray": [{"first_batch_s": 3.0, "tokens_per_s": 9e4}],
                              "naive": [{"first_batch_s": 0.5, "tokens_per_s": 5e4}]},
                     "zeroray_tokens_per_s": 9e4, "naive_tokens_per_s": 5e4, "trainer_tokens_per_s": 4200.0,
                     "trainer_tokens_per_s_per_rank": 2100.0, "vs_trainer": 9e4 / 2100, "vs_naive": 1.8},
    }
    results["targets"] = suite.targets(results)
    return results


def test_targets_verdicts_and_margins():
    by_figure = {t["figure"].split(":")[0]: t for t in _results()["targets"]}
    zero2 = by_figure["overhead ZeRO-2"]
    assert (zero2["met"], zero2["margin"]) == (False, pytest.approx(-0.02))
    assert by_figure["overhead ZeRO-0"]["value"] is None and by_figure["overhead ZeRO-0"]["met"] is None
    assert by_figure["MFU of the ~100M LLM (llama_100m, 1 worker, bf16)"]["met"] is True
    assert by_figure["memory ZeRO-3"]["met"] is False
    assert by_figure["memory ZeRO-3"]["value"] == pytest.approx(0.2)
    assert by_figure["memory ZeRO-1"]["met"] is True
    assert by_figure["DHC×4 ÷ residual step time"]["met"] is False
    assert by_figure["MoE top-2/8 ÷ dense step time (same active params)"]["margin"] == pytest.approx(0.21)
    assert by_figure["start-up"]["met"] is True and by_figure["start-up"]["margin"] == pytest.approx(2.0)
    pipeline = [t for t in _results()["targets"] if t["section"] == "pipeline"]
    assert [t["met"] for t in pipeline] == [True, False]
    assert "scaling" not in {t["section"] for t in _results()["targets"]}  # the section failed: no figure


def test_table_renders_every_section_from_a_saved_results_dict():
    results = json.loads(json.dumps(_results()))  # as read back from bench/results/<date>.json
    md = results_table.render(results)
    for heading in ("## Targets", "## Overhead", "## MFU", "## Memory", "## Models",
                    "## Architecture overheads", "## Start-up", "## Data pipeline"):
        assert heading in md
    assert "## Scaling" not in md and "Section scaling failed: RuntimeError: worker died" in md
    assert "| overhead ZeRO-2: zeroray ÷ hand-written tokens/s | 0.950 | ≥ 0.970 | **missed** | -0.020 |" \
        in md
    assert "| start-up: command → first optimizer step | 18.0 s | ≤ 20.0 s | met | +2.0 s |" in md
    assert "| overhead ZeRO-0: zeroray ÷ hand-written tokens/s | — | ≥ 0.970 | not measured | — |" in md
    assert "| MFU of the ~100M LLM (llama_100m, 1 worker, bf16) | 40.0% | ≥ 35.0% | met | +5.0 pts |" in md
    table_rows = [line for line in md.splitlines() if line.startswith("|")]
    assert all(line.count("|") == table_rows[0].count("|") for line in table_rows[:3])
    assert "900 (+300) / 900 (+300)" in md  # peak RSS per rank with the growth in the stage


def test_only_names_the_unknown_section_and_the_valid_ones():
    assert parse_sections(None, suite.SECTIONS) == list(suite.SECTIONS)
    assert parse_sections("startup, memory", suite.SECTIONS) == ["memory", "startup"]  # the bench's order
    with pytest.raises(ZerorayError, match=r"unknown section\(s\) 'mem'; choose from overhead, .*pipeline"):
        parse_sections("mem", suite.SECTIONS)


def test_startup_timeline_splits_at_the_marks_a_run_leaves(tmp_path):
    startup, overhead = bench_module("startup"), bench_module("overhead")
    logs = tmp_path / "logs"
    logs.mkdir()
    t0 = 1_800_000_000.0

    def stamp(t: float) -> str:
        return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S,%f")[:23]

    (logs / "rank_0.log").write_text("\n".join([
        f"{stamp(t0 + 12.0)} rank0 DeepSpeed INFO [Rank 0] DeepSpeed info: version=0.19.8",
        f"{stamp(t0 + 13.0)} rank0 DeepSpeed INFO DeepSpeedEngine configuration:",
        "    \"partition_activations\": false,",
        f"{stamp(t0 + 14.0)} rank0 DeepSpeed INFO   zero_optimization_stage ...... 2",
        f"{stamp(t0 + 30.0)} rank0 zeroray.trainer INFO checkpoint at step 12",
    ]) + "\n")
    stderr = [(t0 + 3.0, "zeroray: new run in /tmp/x"), (t0 + 5.0, "zeroray: training on 2 worker(s) of …")]
    record = {"time": t0 + 17.0, "since_start_s": 7.0}  # the trainer started at t0 + 10
    got = startup.timeline(t0, stderr, record, tmp_path)
    assert got["first_step_s"] == pytest.approx(17.0)
    assert [p["seconds"] for p in got["phases"]] == pytest.approx([3.0, 2.0, 5.0, 2.0, 2.0, 3.0], abs=1e-3)
    assert sum(p["seconds"] for p in got["phases"]) == pytest.approx(got["first_step_s"], abs=1e-3)
    # Without the DeepSpeed log the phases merge; they still add up to the whole.
    (logs / "rank_0.log").unlink()
    merged = startup.timeline(t0, stderr, record, tmp_path)["phases"]
    assert len(merged) == 4 and sum(p["seconds"] for p in merged) == pytest.approx(17.0)

    records = [{"step": 1, "tokens_per_s": 100.0, "step_time_s": 9.0},
               {"step": 4, "tokens_per_s": 1000.0, "step_time_s": 1.0},
               {"step": 8, "tokens_per_s": 2000.0, "step_time_s": 0.5}]
    # Steps 5–8 only: 4 steps at 0.5 s carrying 1000 tokens each.
    assert overhead.steady_tokens_per_s(records, 4) == pytest.approx(2000.0)
    with pytest.raises(ValueError, match="after step 8"):
        overhead.steady_tokens_per_s(records, 8)


def test_a_second_sitting_of_the_day_does_not_overwrite_the_first(tmp_path):
    files = bench_module("results_file")
    first = files.save({"n": 1}, "# one\n", tmp_path, "2026-12-07-only-startup")
    second = files.save({"n": 2}, "# two\n", tmp_path, "2026-12-07-only-startup")
    third = files.save({"n": 3}, "# three\n", tmp_path, "2026-12-07-only-startup")
    assert [p.name for p in (*first, *second, *third)] == [
        "2026-12-07-only-startup.json", "2026-12-07-only-startup.md", "2026-12-07-only-startup-2.json",
        "2026-12-07-only-startup-2.md", "2026-12-07-only-startup-3.json", "2026-12-07-only-startup-3.md"]
    assert [json.loads(p.read_text())["n"] for p in (first[0], second[0], third[0])] == [1, 2, 3]
