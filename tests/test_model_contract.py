"""Every registered family keeps the contract of models/family.py: what its config declares is what its
module does (real tiny models, real batches from the data pipeline)."""

from __future__ import annotations

import inspect

import pytest
import torch

import models
from data_pipelines import BatchStream
from data_pipelines.objectives import IGNORE
from models.family import IGNORE_INDEX, FamilyConfig, ModelFamily
from tests.conftest import write_config
from trainer.spec import load_spec

# A shipped config of each family, shrunk (model keys) so that a forward pass takes milliseconds.
TINY = {
    "llama": {"name": "llama", "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64},
    "hc_llm": {"name": "hc_llm", "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64, "rate": 2},
    "widenet": {"name": "widenet", "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64},
    "widenet_decoder": {"name": "widenet_decoder", "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64},
    "charformer": {"name": "charformer", "d_model": 32, "n_heads": 4, "n_encoder_layers": 1, "n_decoder_layers": 1,
                   "max_seq_len": 64, "max_block_size": 2, "downsample": 2},
    "convbert": {"name": "convbert", "d_model": 32, "n_layers": 1, "n_heads": 4, "max_seq_len": 64,
                 "pretraining": "mlm"},
    "bert": {"name": "bert", "d_model": 32, "n_layers": 1, "n_heads": 4, "max_seq_len": 64, "pretraining": "mlm"},
}


def test_every_family_is_covered():
    assert set(TINY) == set(models.names())


@pytest.fixture(params=sorted(TINY))
def family(request, tmp_path, small_corpus):
    """(spec, a built model, one batch of its first objective) for each registered family."""
    entry = models.entry(request.param)
    objective = entry.config_cls.objectives[0]
    tokenizer = "bytes" if objective == "span_corruption" else str(small_corpus / "tokenizer.json")
    config = write_config(tmp_path / "c.yaml", small_corpus, tmp_path / "runs", model={"vocab_size": 0},
                          data={"objective": {"kind": objective}, "tokenizer": tokenizer})
    raw_model = TINY[request.param]
    spec = load_spec(config, [f"model={raw_model}".replace("'", "")])
    torch.manual_seed(0)
    batch = next(BatchStream(spec.data.model_copy(update={"document_mask": False}), micro_batch=4))
    return spec, models.build(spec.model), batch


def test_the_classes_implement_the_contract(family):
    spec, model, _ = family
    assert isinstance(spec.model, FamilyConfig) and isinstance(model, ModelFamily)
    cfg = type(spec.model)
    assert cfg.objectives and set(cfg.objectives) <= {"causal", "mlm", "span_corruption"}
    assert cfg.supports_moe == ("moe" in cfg.model_fields)
    with pytest.raises(ValueError, match="vocab_size is 0"):
        type(model)(spec.model.model_copy(update={"vocab_size": 0}))


def test_segment_id_support_is_what_forward_takes(family):
    spec, model, batch = family
    takes = "segment_ids" in inspect.signature(model.forward).parameters
    assert takes == type(spec.model).supports_segment_ids
    if takes:
        ids = batch["input_ids"][:1, :16]
        one_document = torch.zeros_like(ids)
        two = one_document.clone()
        two[:, 8:] = 1
        with torch.no_grad():
            whole, split = model(ids, segment_ids=one_document).logits, model(ids, segment_ids=two).logits
        torch.testing.assert_close(whole[:, :8], split[:, :8])
        assert not torch.allclose(whole[:, 8:], split[:, 8:])


def test_a_declared_kv_cache_decodes_to_the_whole_sequences_logits(family):
    """A model whose config has kv_cache_layers decodes in pieces (a prompt, one token, the rest) with
    transformers' DynamicCache to the logits of one forward over the whole sequence, and the cache holds
    that many layers. An MoE that drops tokens by capacity declares none; dropless, it does."""
    from transformers import DynamicCache

    spec, model, batch = family
    cfg = spec.model
    moe = cfg.moe_config
    if moe is not None and moe.capacity_factor > 0:
        assert cfg.kv_cache_layers == 0, "capacity drops depend on the whole sequence"
        cfg = cfg.model_copy(update={"moe": moe.model_copy(update={"capacity_factor": 0.0})})
        torch.manual_seed(0)
        model = models.build(cfg)
    if not cfg.kv_cache_layers:
        return  # (the widenet encoder: its class is the decoder's, whose forward takes a cache)
    seq2seq = hasattr(model, "decode")
    assert "cache" in inspect.signature(model.decode if seq2seq else model.forward).parameters
    model.eval()
    cache = DynamicCache()
    with torch.no_grad():
        if seq2seq:
            ids = batch["decoder_input_ids"][:2, :12]
            mask = batch.get("attention_mask")
            memory, memory_mask = model.encode(batch["input_ids"][:2], None if mask is None else mask[:2])
            whole = model.decode(ids, memory, memory_mask)
            pieces = [model.decode(part, memory, memory_mask, cache=cache) for part in (ids[:, :5], ids[:, 5:6], ids[:, 6:])]
        else:
            ids = batch["input_ids"][:2, :12]
            whole = model(ids).logits
            pieces = [model(part, cache=cache).logits for part in (ids[:, :5], ids[:, 5:6], ids[:, 6:])]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-4, atol=1e-5)
    assert len(cache.layers) == cfg.kv_cache_layers and cache.get_seq_length() == ids.shape[1]


def test_activation_checkpointing_is_declared_truthfully(family):
    spec, model, batch = family
    if not type(spec.model).supports_activation_checkpointing:
        with pytest.raises(NotImplementedError):
            model.enable_activation_checkpointing()
        return
    model.eval()  # no dropout: the two passes must compute the same function
    with torch.no_grad():
        plain = model(**batch).loss
    model.enable_activation_checkpointing()
    model.train()
    for m in model.modules():  # still no dropout, but the checkpointed (training) path
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    torch.manual_seed(0)
    recomputed = model(**batch).loss
    recomputed.backward()
    torch.testing.assert_close(recomputed.detach(), plain, rtol=1e-4, atol=1e-4)


def test_the_shared_chassis(family):
    spec, model, batch = family
    out = model(**batch)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    total = model.num_parameters()
    assert 0 < model.num_active_parameters() <= total
    assert (spec.model.moe_config is not None) == (model.num_active_parameters() < total)
    groups = model.param_groups(0.1)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert spec.flops_per_token(model) > 0
    for name, shared in model.tied_parameters().items():
        params = dict(model.named_parameters(remove_duplicate=False))
        assert params[name] is params[shared], name


def test_one_label_ignore_value():
    assert IGNORE == IGNORE_INDEX == -100
