"""Pre-training objectives: MLM masking statistics, T5 span corruption, exact resume of their draws,
and the spec's checks (model ↔ objective, vocabulary with the special tokens)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_pipelines import BatchStream, DataConfig
from data_pipelines.objectives import IGNORE, MLMObjective, SpanCorruptionObjective, span_lengths
from trainer.errors import SpecError
from trainer.spec import load_spec

VOCAB, EOS = 257, 256


def stream_windows(rows: int, width: int, seed: int = 0) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(0, 256, size=(rows, width))
    ids[:, ::37] = EOS  # document boundaries inside windows
    return ids


def test_mlm_selects_mask_prob_and_splits_80_10_10():
    windows = stream_windows(64, 256)
    batch = MLMObjective(mask_prob=0.15).rows(windows, 256, VOCAB, EOS, np.random.default_rng(1))
    inputs, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    selected = labels != IGNORE
    assert not selected[windows == EOS].any(), "document separators are never selected"
    assert np.array_equal(labels[selected], windows[selected])
    assert np.array_equal(inputs[~selected], windows[~selected]), "unselected tokens are untouched"
    share = selected.sum() / (windows != EOS).sum()
    assert share == pytest.approx(0.15, abs=0.01)
    masked = (inputs[selected] == VOCAB + 1).mean()
    unchanged = (inputs[selected] == windows[selected]).mean()
    assert masked == pytest.approx(0.8, abs=0.02)
    assert unchanged == pytest.approx(0.1 + 0.1 / VOCAB, abs=0.02)  # 10 % kept + random draws that hit
    assert inputs.max() <= VOCAB + 1


@pytest.mark.parametrize("seq_len, density, mean", [(256, 0.15, 20.0), (64, 0.15, 3.0), (1024, 0.3, 8.0)])
def test_span_corruption_reconstructs_the_window_and_fits(seq_len, density, mean):
    obj = SpanCorruptionObjective(noise_density=density, mean_span_length=mean)
    n = obj.lengths(seq_len)
    assert n.encoder <= seq_len
    longer_noise = round((n.raw + 1) * density)
    longer_encoder = n.raw + 1 - longer_noise + max(round(longer_noise / mean), 1) + 1
    assert longer_encoder > seq_len, "the raw window is the longest that fits"
    windows = stream_windows(8, n.raw)
    batch = obj.rows(windows, seq_len, VOCAB, EOS, np.random.default_rng(3))
    pad, first_sentinel = VOCAB, VOCAB + 2
    assert batch["input_ids"].shape == (8, seq_len) and batch["labels"].shape == (8, n.decoder)
    assert torch.equal(batch["decoder_input_ids"][:, 1:], batch["labels"][:, :-1])
    assert (batch["decoder_input_ids"][:, 0] == pad).all()
    for row in range(8):
        enc = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert len(enc) == n.encoder and enc[-1] == EOS
        dec = batch["labels"][row].tolist()
        assert dec[-1] == EOS
        # Each sentinel in the input is filled with the tokens that follow it in the target.
        spans, current = {}, None
        for token in dec[:-1]:
            if token >= first_sentinel:
                current = token
                spans[current] = []
            else:
                spans[current].append(token)
        assert sorted(spans) == list(range(first_sentinel, first_sentinel + n.spans))
        assert all(len(s) > 0 for s in spans.values())
        rebuilt = [t for token in enc[:-1] for t in (spans[token] if token >= first_sentinel else [token])]
        assert rebuilt == windows[row].tolist()
        assert sum(map(len, spans.values())) == n.noise == round(density * n.raw)


def test_too_short_sequence_for_span_corruption_is_a_clear_error():
    with pytest.raises(ValueError, match="too short"):
        span_lengths(2, 0.5, 1.0)


@pytest.mark.parametrize("objective", [{"kind": "mlm"}, {"kind": "span_corruption", "mean_span_length": 5}])
def test_objective_draws_resume_exactly(tmp_path, objective):
    folder = tmp_path / "docs"
    folder.mkdir()
    for f in range(2):
        (folder / f"part{f}.jsonl").write_text(
            "".join(json.dumps({"text": f"file {f} document {i} " + "abc" * i}) + "\n" for i in range(30))
        )
    cfg = DataConfig(sources=[{"path": str(folder)}], tokenizer="bytes", seq_len=48, tokenize_batch=3,
                     objective=objective, seed=7, streams=2)
    reference = BatchStream(cfg, 4)
    uninterrupted = [next(reference) for _ in range(40)]
    first = BatchStream(cfg, 4)
    head = [next(first) for _ in range(15)]
    resumed = BatchStream(cfg, 4)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = [next(resumed) for _ in range(25)]
    for a, b in zip(uninterrupted, head + tail, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    other_seed = BatchStream(cfg.model_copy(update={"seed": 8}), 4)
    assert not torch.equal(next(other_seed)["input_ids"], uninterrupted[0]["input_ids"])


def test_spec_checks_the_objective_and_counts_special_tokens(tiny_config):
    with pytest.raises(SpecError, match="does not fit model 'llama'"):
        load_spec(tiny_config, ["data.objective.kind=mlm"])
    with pytest.raises(SpecError, match="data.objective"):
        load_spec(tiny_config, ["data.objective.kind=unknown"])
    spec = load_spec(tiny_config, ["data.tokenizer=bytes"])
    assert spec.model.vocab_size == VOCAB  # causal: no special tokens
