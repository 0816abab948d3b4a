"""Native transformers classes for the architectures transformers has (models/hf_native.py): each shipped
llama shape, dense and MoE, loads without zeroray and gives zeroray's logits and greedy decoding; bert and
convbert, MLM and replaced-token detection, give zeroray's outputs (and their generator's)."""

from __future__ import annotations

import json

import pytest
import torch

import models
from launcher.export import write_export
from models.convbert_config import BertConfig, ConvBertConfig
from models.hf_native import build_native, build_native_generator, native_class_name
from models.llama import HCLLMConfig, LlamaConfig
from tests.export_check import check_native, check_native_encoder, check_tokenizer
from tests.test_generate import built, tiny_spec

# Tied dense embeddings are covered by the CLI test's export (tests/test_launchers.py).
SHAPES = {
    "dense-untied-gqa": {"tie_embeddings": False, "n_kv_heads": 2},
    "moe-tied-dropless": {"moe": {"num_experts": 4, "top_k": 2}},
}


@pytest.mark.slow  # a fresh interpreter per shape imports torch and transformers (~10 s)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_llama_exports_to_its_native_class(shape, tmp_path):
    cfg = LlamaConfig(vocab_size=101, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, rope_theta=5e5,
                      **SHAPES[shape])
    torch.manual_seed(0)
    ours = models.build(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a wrong ε or a missing norm would show
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf = build_native(cfg, ours.state_dict())
    hf.save_pretrained(tmp_path)
    (tmp_path / "zeroray_export.json").write_text(json.dumps({"class": native_class_name(cfg), "remote_code": False}))
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    check_native(tmp_path, ours, torch.randint(0, 101, (2, 40)))


def test_architectures_without_a_native_class_keep_remote_code():
    assert native_class_name(HCLLMConfig(vocab_size=50)) is None
    dropping = LlamaConfig(vocab_size=50, moe={"num_experts": 4, "capacity_factor": 1.25})
    assert native_class_name(dropping) is None, "transformers' MoE blocks drop no tokens"
    with pytest.raises(ValueError, match="no native"):
        build_native(dropping, {})


ENCODERS = {  # (config class, pretraining) → the class it exports to
    ("bert", "mlm"): "ElectraForMaskedLM", ("bert", "rtd"): "ElectraForPreTraining",
    ("convbert", "mlm"): "ConvBertForMaskedLM", ("convbert", "rtd"): "ConvBertModel",
}


@pytest.mark.parametrize(("family", "pretraining"), sorted(ENCODERS))
def test_encoders_map_onto_their_native_classes(family, pretraining):
    """In process: the same outputs from the native model as from zeroray's, for a state dict without the
    duplicate names of shared weights (as DeepSpeed consolidates one)."""
    config_cls = {"bert": BertConfig, "convbert": ConvBertConfig}[family]
    cfg = config_cls(vocab_size=103, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, embedding_size=16,
                     pretraining=pretraining, dropout=0.0)
    assert native_class_name(cfg) == ENCODERS[family, pretraining]
    torch.manual_seed(0)
    ours = models.build(cfg).eval()
    state = {name: p.detach() for name, p in ours.named_parameters()}  # each shared weight once
    hf, generator = build_native(cfg, state), build_native_generator(cfg, state)
    assert type(hf).__name__ == ENCODERS[family, pretraining] and (generator is None) == (pretraining == "mlm")
    ids = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        if pretraining == "mlm" or family == "bert":
            torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(hf(ids).last_hidden_state, ours.discriminator(ids).last_hidden_state,
                                       rtol=1e-5, atol=1e-5)
        if generator is not None:
            torch.testing.assert_close(generator(ids).logits, ours.generator(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a fresh interpreter per case (~10 s); convbert rtd: tests/test_train_families.py
@pytest.mark.parametrize(("config", "pretraining"), [("bert_tiny.yaml", "rtd"), ("bert_tiny.yaml", "mlm"),
                                                     ("convbert_tiny.yaml", "mlm")])
def test_encoder_export_loads_without_zeroray(config, pretraining, small_corpus, tmp_path):
    spec = tiny_spec(config, small_corpus, tmp_path, f"model.pretraining={pretraining}", "model.n_layers=2")
    module = built(spec)
    info = write_export(spec, module.state_dict(), tmp_path / "hf")
    assert not info["remote_code"] and info["class"] == ENCODERS[spec.model.name, pretraining]
    assert (tmp_path / "hf" / "generator").is_dir() == (pretraining == "rtd")
    check_native_encoder(tmp_path / "hf", module, torch.randint(0, spec.model.vocab_size - 2, (2, 48)))
    check_tokenizer(tmp_path / "hf", spec)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "trust_remote_code" not in card and ENCODERS[spec.model.name, pretraining] in card, card
