"""Run-spec validation, overrides, and the CLI's handling of bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from pydantic import ValidationError

from launcher.cli import main
from tests.conftest import write_config
from trainer.errors import SpecError
from trainer.spec import apply_overrides, load_spec


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


def test_valid_spec_resolves_paths_and_vocab(tiny_config, small_corpus):
    spec = load_spec(tiny_config, ["trainer.zero_stage=3", "cluster.workers=1", "trainer.lr=3e-4"])
    assert spec.trainer.lr == 3e-4
    assert spec.trainer.zero_stage == 3 and spec.cluster.workers == 1
    assert spec.model.vocab_size == 512  # taken from the tokenizer
    assert spec.output.name == "tiny"  # from the config file name
    assert spec.data.sources[0].path.startswith("/")
    with pytest.raises(ValidationError):  # frozen
        spec.trainer.zero_stage = 1  # type: ignore[misc]


def test_loader_workers_unset_read_in_process_on_one_core_workers(tmp_path, small_corpus):
    """A loader process needs a core of its own: unset, data.loader_workers is 0 for 1-core workers and the
    data section's default (1) otherwise; set, it is what was written, and it survives the saved spec."""
    config = write_config(tmp_path / "c.yaml", small_corpus, tmp_path / "runs")
    raw = yaml.safe_load(config.read_text())
    del raw["data"]["loader_workers"]
    config.write_text(yaml.safe_dump(raw))
    one_core = load_spec(config)
    assert one_core.cluster.cpus_per_worker == 1 and one_core.data.loader_workers == 0
    assert load_spec(config, ["cluster.cpus_per_worker=2"]).data.loader_workers == 1
    assert load_spec(config, ["data.loader_workers=1"]).data.loader_workers == 1
    (tmp_path / "spec.yaml").write_text(load_spec(config, ["data.loader_workers=1"]).to_yaml())
    assert load_spec(tmp_path / "spec.yaml").data.loader_workers == 1


def test_overrides_parse_yaml_values_and_lists():
    raw = {"trainer": {"lr": 1.0}, "data": {"sources": [{"path": "a"}]}}
    out = apply_overrides(raw, ["trainer.lr=3e-4", "trainer.betas=[0.9, 0.99]", "data.sources.0.path=b",
                                "cluster.workers=4"])
    assert out["trainer"]["lr"] == "3e-4"  # YAML 1.1 reads this as text; the spec turns it into a float
    assert out["trainer"]["betas"] == [0.9, 0.99]
    assert out["data"]["sources"][0]["path"] == "b"
    assert out["cluster"]["workers"] == 4
    assert raw["trainer"]["lr"] == 1.0  # input untouched
    for bad in ["trainer.lr", "=3", "data.sources.5.path=x"]:
        with pytest.raises(SpecError):
            apply_overrides(raw, [bad])


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["trainer.zero_stage=4"], "trainer.zero_stage"),
        (["trainer.zero_stage=-1"], "trainer.zero_stage"),
        (["trainer.zero_stag=1"], "did you mean 'zero_stage'"),
        (["model.name=lama"], "did you mean 'llama'"),
        (["trainer.global_batch_size=7"], "trainer.global_batch_size (7)"),
        (["trainer.warmup_steps=50"], "warmup_steps (50) must be smaller than max_steps"),
        (["model.d_model=abc"], "model.d_model"),
        (["model.n_heads=5"], "divisible by n_heads"),
        (["data.seq_len=128"], "exceeds model.max_seq_len"),
        (["model.vocab_size=100"], "smaller than the tokenizer's vocabulary"),
        (["data.tokenizer=/no/such/tokenizer.json"], "is not a file"),
        (["cluster.workers=0"], "cluster.workers"),
        (["trainer.precision=fp8"], "trainer.precision"),
        (["output.dir=memory://runs"], "output.dir: 'memory://runs': memory:// lives inside one process"),
        (["model.name=widenet_decoder", "data.document_mask=true"], "data.document_mask: model 'widenet_decoder'"),
    ],
)
def test_bad_values_name_the_key(tiny_config, overrides, fragment):
    with pytest.raises(SpecError) as err:
        load_spec(tiny_config, overrides)
    assert fragment in str(err.value)


def test_missing_file_and_yaml_syntax(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: llama\n  d_model: [1, 2\n")
    with pytest.raises(SpecError, match="not valid YAML at line"):
        load_spec(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(SpecError, match="empty"):
        load_spec(empty)


@pytest.mark.parametrize(
    "problem, fragment",
    [
        ("missing_config", "not found"),
        ("missing_data", "does not exist"),
        ("empty_documents", "produced no tokens"),
        ("empty_file", "Is a file empty or damaged?"),
        ("wrong_column", "data.text_field"),
        ("zero_stage", "trainer.zero_stage"),
        ("unknown_model", "not a known model"),
    ],
)
def test_cli_bad_input_is_one_paragraph_and_leaves_no_run_dir(tmp_path, small_corpus, capsys, problem, fragment):
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "c.yaml", small_corpus, runs)
    overrides: list[str] = []
    if problem == "missing_config":
        config = tmp_path / "missing.yaml"
    elif problem == "missing_data":
        overrides = [f"data.sources.0.path={tmp_path / 'no-such-folder'}"]
    elif problem in ("empty_documents", "empty_file"):
        folder = tmp_path / problem
        folder.mkdir()
        texts = ["", ""] if problem == "empty_documents" else pa.array([], pa.string())
        for shard in range(4):  # one file per logical stream (data.streams = 4)
            pq.write_table(pa.table({"text": texts}), folder / f"part{shard}.parquet")
        overrides = [f"data.sources.0.path={folder}"]
    elif problem == "wrong_column":
        overrides = ["data.text_field=body"]
    elif problem == "zero_stage":
        overrides = ["trainer.zero_stage=7"]
    elif problem == "unknown_model":
        overrides = ["model.name=gpt9"]
    code, err = run_cli(capsys, "train", str(config), *overrides)
    assert code == 2
    assert fragment in err
    assert "Traceback" not in err
    assert not runs.exists()  # nothing half-written blocks the next try


def test_cli_debug_shows_traceback(tmp_path, capsys):
    code, err = run_cli(capsys, "--debug", "config", "show", str(tmp_path / "missing.yaml"))
    assert code == 2 and "Traceback" in err


def test_console_script_help_and_config_show(tiny_config):
    exe = [sys.executable, "-m", "launcher.cli"]
    for args in ([], ["train"], ["config", "show"], ["data", "prepare"], ["models"]):
        out = subprocess.run(exe + args + ["--help"], capture_output=True, text=True, check=True).stdout
        assert "usage: zeroray" in out
    shown = subprocess.run(exe + ["config", "show", str(tiny_config), "trainer.zero_stage=3"],
                           capture_output=True, text=True, check=True).stdout
    spec_part, ds_part = shown.split("# DeepSpeed config")
    assert yaml.safe_load(spec_part)["trainer"]["zero_stage"] == 3
    ds = yaml.safe_load(ds_part.split("\n", 1)[1])
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_batch_size"] == 4 * 1 * 2


def test_shipped_configs_validate(tmp_path):
    from tests.conftest import REPO

    for config in sorted((REPO / "configs").glob("*.yaml")):
        # Their data is built by `zeroray data prepare`; the byte tokenizer stands in for it here.
        spec = load_spec(config, ["data.tokenizer=bytes", f"output.dir={tmp_path}"])
        assert spec.model.vocab_size >= 257, config


def test_configuration_reference_is_current():
    from launcher.config_reference import render
    from tests.conftest import REPO

    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == render(), "regenerate: python -m launcher.config_reference > docs/configuration.md"


def test_models_command_lists_sizes_and_flops(capsys):
    import torch

    import models
    from launcher.model_table import CONFIGS

    assert main(["models", "--json"]) == 0
    rows = {r["config"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {p.name for p in CONFIGS.glob("*.yaml")}
    moe = rows["hc_llm_moe_tiny.yaml"]
    assert moe["active_params"] < moe["params"]
    spec = load_spec(CONFIGS / "demo.yaml", ["data.tokenizer=bytes", f"model.vocab_size={rows['demo.yaml']['vocab_size']}"])
    with torch.device("meta"):
        demo = models.build(spec.model)
    assert rows["demo.yaml"]["params"] == demo.num_parameters() == rows["demo.yaml"]["active_params"]
    assert rows["demo.yaml"]["flops_per_token"] == demo.flops_per_token(spec.data.seq_len)


def test_unknown_key_inside_a_list_item_is_named_with_a_suggestion(tiny_config):
    with pytest.raises(SpecError) as err:
        load_spec(tiny_config, ["data.sources.0.wieght=2"])
    assert "data.sources.0.wieght: unknown key; did you mean 'weight'?" in str(err.value)
