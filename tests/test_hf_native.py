"""Native transformers classes for the architectures transformers has (models/hf_native.py): each shipped
llama shape, dense and MoE, loads without zeroray and gives zeroray's logits and greedy decoding."""

from __future__ import annotations

import json

import pytest
import torch

import models
from models.hf_native import build_native, native_class_name
from models.llama import HCLLMConfig, LlamaConfig
from tests.export_check import check_native

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
