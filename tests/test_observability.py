"""Held-out evaluation batches, MFU's peak table, the progress line and the metric trackers.

The trackers are fed records directly and checked through the files they write (read back with
W&B's record format and MLflow's own client); the Ray-backed run that produces such records is
in tests/test_launchers.py (eval, mfu, memory and MLflow on one CLI run).
"""

from __future__ import annotations

import json
import logging
import math
import struct

import pytest
import torch

from launcher.progress import format_line
from launcher.trackers import Trackers, open_trackers, scalars
from trainer.errors import SpecError, ZerorayError
from trainer.evaluation import Evaluator, held_out_batches
from trainer.metrics import gpu_peak_flops
from trainer.spec import load_spec
from trainer.storage import RunDir


def records(n: int = 3) -> list[dict]:
    """Records shaped like the trainer's (two ranks, one evaluation)."""
    out = []
    for step in range(1, n + 1):
        out.append({"step": step, "loss": 6.0 - 0.5 * step, "aux/load_balance": 0.01 * step, "lr": 1e-3 * step,
                    "grad_norm": None, "tokens_per_s": 1000.0 + step, "mfu": 0.01 * step,
                    "memory/peak_gb": [1.5, 1.25 + step], "moe/tokens_per_expert": [3, 5], "max_steps": n,
                    "time": 1.7e9 + step, "precision": "bf16"})
    out[-1].update({"eval/loss": 4.25, "eval/perplexity": math.exp(4.25),
                    "eval/samples": [{"prompt": "From: ", "text": "alice@example.org"}, {"prompt": "def ", "text": "f():"}]})
    return out


def test_held_out_windows_are_dealt_round_robin_and_fixed(tiny_config, small_corpus):
    """Rank r of W scores windows r, r+W, … of one stream over the val split, so W ranks together
    score the same first windows as one rank does."""
    val = f"eval.sources=[{{path: {small_corpus / 'val'}}}]"
    two = load_spec(tiny_config, [val, "eval.batches=2"])  # micro-batch 4: 8 windows per rank
    one = load_spec(tiny_config, [val, "eval.batches=4", "cluster.workers=1", "data.streams=4"])
    assert one.eval.sources[0].path == str(small_corpus / "val")  # made absolute by resolve
    single = torch.cat([b["input_ids"] for b in held_out_batches(one, 0, 1)])
    ranks = [torch.cat([b["input_ids"] for b in held_out_batches(two, r, 2)]) for r in range(2)]
    assert single.shape == (16, 32) and all(r.shape == (8, 32) for r in ranks)
    assert torch.equal(ranks[0], single[0::2]) and torch.equal(ranks[1], single[1::2])
    assert len({tuple(row.tolist()) for row in single}) == 16  # distinct windows, not one repeated
    assert torch.equal(ranks[0], torch.cat([b["input_ids"] for b in held_out_batches(two, 0, 2)]))

    summed = {"eval/loss_sum": 2 * 3.0 * 100 + 4.0 * 50, "eval/tokens": 250.0}
    assert Evaluator.metrics(summed) == pytest.approx({"eval/loss": 3.2, "eval/perplexity": math.exp(3.2)})


def test_eval_settings_are_checked(tiny_config, small_corpus, tmp_path):
    with pytest.raises(SpecError, match=r"eval.every=5 but eval.sources and eval.sample_prompts are empty"):
        load_spec(tiny_config, ["eval.every=5"])
    prompts = load_spec(tiny_config, ["eval.every=5", "eval.sample_prompts=[hello]"]).eval  # samples alone
    assert prompts.due(5, last=False) and not prompts.due(6, last=False) and prompts.due(6, last=True)
    assert not load_spec(tiny_config).eval.due(12, last=True), "nothing to evaluate"
    with pytest.raises(SpecError, match=r"eval.sample_prompts: model 'widenet' trains on mlm and does not generate"):
        load_spec(tiny_config, ["model={name: widenet, d_model: 64, n_layers: 2, n_heads: 4, max_seq_len: 64}",
                                "data.objective={kind: mlm}", "eval.sample_prompts=[hello]"])
    with pytest.raises(SpecError, match=r"output.trackers.0: .*'tensorboard', 'wandb' or 'mlflow'"):
        load_spec(tiny_config, ["output.trackers=[tensorbord]"])
    missing = load_spec(tiny_config, [f"eval.sources=[{{path: {tmp_path / 'nope'}}}]"])
    with pytest.raises(ZerorayError, match=r"^eval.sources: .*nope"):
        held_out_batches(missing, 0, 2)


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H200", "fp32", 67e12),
    ("NVIDIA GH200 480GB", "bf16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "fp16", 312e12),
    ("NVIDIA A10G", "bf16", 125e12),
    ("NVIDIA L4", "bf16", 121e12),
    ("NVIDIA L40S", "bf16", 362e12),
    ("Tesla V100-SXM2-16GB", "bf16", None),  # no bf16 before Ampere
    ("Tesla T4", "fp16", 65e12),
    ("Radeon Something", "bf16", None),
])
def test_gpu_peak_table_matches_device_names_as_words(name, precision, peak):
    assert gpu_peak_flops(name, precision) == peak


def test_progress_line_stays_key_value_pairs():
    rec = {"step": 3, "max_steps": 10, "loss": 4.5, "lr": 1e-3, "tokens_per_s": 1234.5, "step_time_s": 0.5,
           "mfu": 0.0123, "eval/loss": 4.25}
    line = format_line(rec)
    pairs = dict(item.split("=", 1) for item in line.split(" "))
    assert pairs == {"step": "3/10", "loss": "4.5000", "lr": "0.001", "tokens_per_s": "1234", "mfu": "0.0123",
                     "eval/loss": "4.2500", "eta_s": "4"}
    assert "mfu" not in format_line({**rec, "mfu": None}) and "eval" not in format_line(rec | {"eval/loss": None})


def test_progress_shows_each_sample_on_a_line_of_its_own(tmp_path):
    import io

    from launcher.progress import Progress

    metrics, out = tmp_path / "metrics.jsonl", io.StringIO()
    with Progress(metrics, 0, 3, interval_s=0, stream=out):
        metrics.write_text("".join(json.dumps({**r, "step_time_s": 0.5}) + "\n" for r in records()))
    lines = out.getvalue().splitlines()
    assert lines[-3:-1] == ["step 3 sample: 'From: ' → 'alice@example.org'", "step 3 sample: 'def ' → 'f():'"]
    assert lines[-1].startswith("step=3/3 ") and not any("sample" in line for line in lines[:-3])


def wandb_history(run_file) -> tuple[dict, list[dict]]:
    """(config, history rows) of a W&B `.wandb` file: a 7-byte header, then LevelDB log blocks of
    32 KiB whose chunks (crc32c, length, type) carry protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, config, rows = 7, b"", {}, []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # the tail of a block too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = pb.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "run":
                config = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.run.config.update}
            elif record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return config, rows


def test_wandb_and_mlflow_receive_every_record(tiny_config, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own client reads the file store below
    spec = load_spec(tiny_config, ["output.trackers=[wandb, mlflow]", "output.project=obs"])
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    sent = records()
    trackers = open_trackers(spec, run)
    assert list(trackers.sinks) == ["wandb", "mlflow"]
    for rec in sent:
        trackers(rec)
    trackers.close()
    expected = [scalars(r) for r in sent]
    assert expected[0]["memory/peak_gb/1"] == 2.25 and "precision" not in expected[0] and "grad_norm" not in expected[0]

    # W&B: an offline run inside the run directory, holding every record at its step, and the spec.
    (run_file,) = run.root.glob("wandb/offline-run-*/run-*.wandb")
    config, rows = wandb_history(run_file)
    assert config["trainer.lr"] == spec.trainer.lr and config["cluster.workers"] == 2
    assert [row["_step"] for row in rows] == [1, 2, 3]
    for row, exp in zip(rows, expected, strict=True):
        assert {k: row[k] for k in exp} == pytest.approx(exp)
    assert rows[-1]["eval/samples/_type"] == "table-file" and rows[-1]["eval/samples/nrows"] == 2  # a W&B table
    assert "eval/samples/_type" not in rows[0]

    # MLflow: the file store in the run directory, read back with MLflow's client.
    client = MlflowClient(tracking_uri=f"file:{run.root / 'mlruns'}")
    ids = json.loads((run.root / "trackers.json").read_text())
    mlflow_run = client.get_run(ids["mlflow"])
    assert mlflow_run.info.status == "FINISHED"
    assert client.get_experiment(mlflow_run.info.experiment_id).name == "obs"
    assert mlflow_run.data.params["trainer.lr"] == str(spec.trainer.lr)
    assert mlflow_run.data.params["data.sources.0.path"] == spec.data.sources[0].path
    for name in expected[-1]:
        history = {m.step: m.value for m in client.get_metric_history(ids["mlflow"], name)}
        assert history == pytest.approx({r["step"]: e[name] for r, e in zip(sent, expected, strict=True)
                                         if name in e}), name
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "eval/loss")] == [3]
    (artifact,) = [a.path for a in client.list_artifacts(ids["mlflow"], "samples")]
    assert artifact == "samples/step_00000003.md"
    text = (run.root / "mlruns").glob(f"*/{ids['mlflow']}/artifacts/{artifact}")
    assert next(text).read_text() == "**From: **alice@example.org\n\n**def **f():"

    # A relaunch of the run directory continues the same MLflow and W&B runs.
    again = open_trackers(spec, run)
    again({**sent[-1], "step": 4, "loss": 1.0})
    again.close()
    assert json.loads((run.root / "trackers.json").read_text()) == ids
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "loss")] == [1, 2, 3, 4]
    assert len(list(run.root.glob(f"wandb/offline-run-*-{ids['wandb']}"))) == 2


def test_a_failing_tracker_is_dropped_and_the_others_go_on(tmp_path, caplog):
    from launcher.trackers import TensorBoardSink

    class Broken:
        def __call__(self, record):
            raise OSError("disk full")

        def close(self):
            pass

    board = TensorBoardSink(tmp_path / "tb")
    trackers = Trackers({"broken": Broken(), "tensorboard": board})
    with caplog.at_level(logging.WARNING, logger="zeroray.trackers"):
        for rec in records():
            trackers(rec)
    trackers.close()
    assert list(trackers.sinks) == []
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "tracker broken failed at step 1" in warnings[0] and "disk full" in warnings[0]
    from tests.test_launchers import tensorboard_scalars

    written = tensorboard_scalars(tmp_path / "tb")
    assert [step for step, _ in written["loss"]] == [1, 2, 3]
    assert [step for step, _ in written["eval/loss"]] == [3]
    assert [v for _, v in written["memory/peak_gb/1"]] == pytest.approx([2.25, 3.25, 4.25])
    assert [step for step, _ in written["eval/samples/text_summary"]] == [3], "the samples as a text summary"
