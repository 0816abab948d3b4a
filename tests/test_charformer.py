"""Charformer: GBST shapes, masking and block weights; the encoder–decoder's padding invariance,
causality, gradients, FLOPs, training and bf16."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import models.charformer  # noqa: F401  (registers the family)
from models.charformer import CharformerConfig
from models.layers.gbst import GBST, masked_block_mean
from models.registry import build

VOCAB = 257 + 2 + 4  # bytes + end, pad, mask, 4 sentinels


def tiny(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    fields = dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, max_seq_len=64)
    return build(CharformerConfig(**{**fields, **kw}))


def batch(b: int = 2, length: int = 23, target: int = 9, pad_from: int | None = 17) -> dict[str, torch.Tensor]:
    """A span-corruption-shaped batch; row 1 is padded from `pad_from` on (None: no padding)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    if pad_from is not None:
        ids[1, pad_from:], mask[1, pad_from:] = 257, 0
    labels = torch.randint(0, VOCAB, (b, target), generator=g)
    decoder_ids = torch.cat([torch.full((b, 1), 257), labels[:, :-1]], dim=1)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids, "labels": labels}


# ---- GBST ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_block", [1, 2, 3, 4])
@pytest.mark.parametrize("downsample", [1, 2, 3, 4])
def test_gbst_shapes_for_every_block_size_and_downsampling_rate(max_block, downsample):
    torch.manual_seed(0)
    gbst = GBST(8, max_block, downsample)
    for length in (1, 5, 7, 12, 13):  # divisible by some of M, d_s and not by others
        out = gbst(torch.randn(2, length, 8), torch.ones(2, length))
        short = -(-length // downsample)
        assert out.hidden.shape == (2, short, 8)
        assert out.mask.shape == (2, short) and out.mask.all()
        assert out.block_weights.shape == (2, length, max_block)


def test_masked_block_mean_divides_by_real_positions():
    x = torch.arange(1.0, 8.0).view(1, 7, 1)  # 1..7
    mask = torch.tensor([[True, True, True, False, True, False, False]])
    means, real = masked_block_mean(x, mask, 3)
    # blocks [1,2,3], [4̶,5,6̶], [7̶] (+ one position past the end)
    torch.testing.assert_close(means.view(-1), torch.tensor([2.0, 5.0, 0.0]))
    assert real.tolist() == [[True, True, False]]


@pytest.mark.parametrize("kernel", [None, 3])
@pytest.mark.parametrize("calibration", [False, True])
def test_gbst_padding_does_not_change_real_positions(kernel, calibration):
    torch.manual_seed(0)
    gbst = GBST(16, max_block_size=4, downsample=3, conv_kernel=kernel, score_calibration=calibration)
    x = torch.randn(1, 13, 16)
    padded = torch.cat([x, torch.randn(1, 7, 16)], dim=1)  # padding holds junk, not zeros
    mask = torch.zeros(1, 20, dtype=torch.long)
    mask[:, :13] = 1
    alone, with_pad = gbst(x), gbst(padded, mask)
    assert with_pad.mask.tolist() == [[True] * 5 + [False] * 2]  # ⌈13/3⌉ real of ⌈20/3⌉
    torch.testing.assert_close(with_pad.hidden[:, :5], alone.hidden)
    torch.testing.assert_close(with_pad.block_weights[:, :13], alone.block_weights)


@pytest.mark.parametrize("calibration", [False, True])
def test_block_weights_are_a_distribution_over_block_sizes(calibration):
    torch.manual_seed(0)
    gbst = GBST(16, max_block_size=4, downsample=2, score_calibration=calibration)
    mask = torch.ones(2, 11)
    mask[1, 6:] = 0
    weights = gbst(torch.randn(2, 11, 16), mask).block_weights
    assert weights.dtype == torch.float32 and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 11))
    assert not torch.allclose(weights, torch.full_like(weights, 0.25))  # the scorer does choose


# ---- the encoder–decoder -------------------------------------------------------------------------

def test_padding_does_not_change_encoder_output_or_logits():
    model = tiny(max_block_size=3, downsample=2).eval()
    b = batch(b=1, length=13, pad_from=None)
    padded_ids = torch.cat([b["input_ids"], torch.full((1, 8), 257)], dim=1)
    padded_mask = torch.cat([b["attention_mask"], torch.zeros(1, 8, dtype=torch.long)], dim=1)
    with torch.no_grad():
        memory, memory_mask = model.encode(b["input_ids"], b["attention_mask"])
        padded_memory, padded_memory_mask = model.encode(padded_ids, padded_mask)
        logits = model(**b).logits
        padded_logits = model(padded_ids, padded_mask, b["decoder_input_ids"]).logits
    assert memory.shape[1] == 7 and padded_memory.shape[1] == 11  # ⌈13/2⌉, ⌈21/2⌉
    assert padded_memory_mask.tolist() == [[True] * 7 + [False] * 4]
    torch.testing.assert_close(padded_memory[:, :7], memory, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded_logits, logits, rtol=1e-4, atol=1e-5)


def test_decoder_is_causal():
    model = tiny().eval()
    b = batch(pad_from=None)
    changed = b["decoder_input_ids"].clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 256
    with torch.no_grad():  # attention_mask None: no padding
        a = model(b["input_ids"], None, b["decoder_input_ids"]).logits
        c = model(b["input_ids"], None, changed).logits
    torch.testing.assert_close(a[:, :5], c[:, :5])
    assert not torch.allclose(a[:, 5:], c[:, 5:])


@pytest.mark.parametrize("tie", [False, True])
def test_forward_backward_shapes_and_every_parameter_gets_a_gradient(tie):
    model = tiny(tie_embeddings=tie, score_calibration=True)
    out = model(**batch())
    assert out.logits.shape == (2, 9, VOCAB)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and out.aux_losses is None
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_parameter_count_and_tying():
    for tie in (False, True):
        model = tiny(tie_embeddings=tie)
        cfg, d, h, v = model.config, 32, model.config.mlp_hidden, VOCAB
        encoder_block = 4 * d * d + 3 * d * h + 2 * d
        decoder_block = 8 * d * d + 3 * d * h + 3 * d
        gbst = d * d * cfg.max_block_size + d
        expected = v * d * (1 if tie else 2) + gbst + 2 * encoder_block + 2 * decoder_block + 2 * d
        assert model.num_parameters() == model.num_active_parameters() == expected
        assert model.num_parameters(exclude_embeddings=True) == expected - v * d
        assert model.tied_parameters() == ({"lm_head.weight": "embed.weight"} if tie else {})
        if tie:
            assert model.lm_head.weight is model.embed.weight


def test_weight_decay_groups_cover_each_parameter_once():
    model = tiny(tie_embeddings=True)
    groups = model.param_groups(0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    assert all(p.dim() < 2 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
    assert any(p is model.gbst.conv.weight for p in groups[0]["params"])


@pytest.mark.parametrize(
    "kw",
    [{}, {"max_block_size": 3, "downsample": 3, "conv_kernel": 5, "score_calibration": True, "tie_embeddings": True},
     {"gbst": False, "downsample": 1}],
    ids=["default", "calibrated-ds3-k5-tied", "bytes-no-gbst"],
)
def test_flops_per_token_matches_counted_matmuls(kw):
    """FlopCounterMode counts every matmul and convolution of a real forward+backward (the padded
    row costs the same: everything runs densely). The CPU SDPA kernel has no FLOP formula: the
    attention scores are the analytic term, 12·d per query–key pair (encoder S², decoder T² and T·S)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny(**kw)
    b = batch(length=23, target=9)
    with FlopCounterMode(display=False) as counter:
        model(**b).loss.backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert not any("attention" in op for op in counts), counts
    assert ("aten.convolution" in counts) == model.config.gbst
    counted = sum(counts.values()) / (2 * 23)
    cfg, length, target = model.config, 23, 9
    short = -(-length // cfg.downsample)
    attention = 12 * cfg.d_model * (cfg.n_encoder_layers * short**2 + cfg.n_decoder_layers * (target**2 + target * short))
    assert model.flops_per_token(length, target) - attention / length == pytest.approx(counted, rel=1e-6)


def test_a_few_adam_steps_reduce_the_loss():
    model = tiny()
    b = batch()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


def test_bf16_forward_is_close_to_fp32():
    model = tiny()
    b = batch()
    with torch.no_grad():
        ref = model(**b).loss
        low = model.to(torch.bfloat16)(**b).loss
    assert low.dtype == torch.float32  # the loss is computed in fp32
    assert abs(ref.item() - low.item()) < 0.05


def test_sequences_longer_than_max_are_refused():
    model = tiny()
    b = batch(length=65, pad_from=None)
    with pytest.raises(ValueError, match="input_ids of 65 tokens exceeds model.max_seq_len 64"):
        model(**b)


def test_without_gbst_bytes_go_straight_into_the_encoder():
    """The byte-level baseline: the same encoder–decoder, no GBST weights, one encoder position per
    byte; padding still masked."""
    with_gbst, plain = tiny(), tiny(gbst=False, downsample=1)
    assert plain.gbst is None
    gbst_params = sum(p.numel() for p in with_gbst.gbst.parameters())
    assert plain.num_parameters() == with_gbst.num_parameters() - gbst_params
    b = batch(b=2, length=13, pad_from=9)
    with torch.no_grad():
        memory, mask = plain.encode(b["input_ids"], b["attention_mask"])
        alone, _ = plain.encode(b["input_ids"][1:, :9], None)
    assert memory.shape[1] == 13 and mask.tolist() == [[True] * 13, [True] * 9 + [False] * 4]
    torch.testing.assert_close(memory[1:, :9], alone, rtol=1e-4, atol=1e-5)
    out = plain(**b)
    out.loss.backward()
    for name, p in plain.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert plain.flops_per_token(256, 48) > with_gbst.flops_per_token(256, 48)  # the encoder sees 2× the positions


def test_config_errors_name_the_field():
    with pytest.raises(ValidationError, match=r"d_model \(30\) must be divisible by n_heads \(4\)"):
        CharformerConfig(d_model=30, n_heads=4)
    with pytest.raises(ValidationError, match="head size"):
        CharformerConfig(d_model=36, n_heads=4)
    with pytest.raises(ValidationError, match="conv_kernel"):
        CharformerConfig(conv_kernel=0)
    with pytest.raises(ValidationError, match=r"downsample \(2\) needs GBST.*set downsample to 1"):
        CharformerConfig(gbst=False)
    assert CharformerConfig(gbst=False, downsample=1, max_block_size=7).max_block_size == 7  # ignored, allowed
    with pytest.raises(ValueError, match="vocab_size is 0"):
        build(CharformerConfig())
    assert CharformerConfig.objectives == ("span_corruption",)


def test_byte_level_baseline_exports_to_transformers_with_the_same_logits(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    from models.hf import ZerorayConfig, wrapper_for

    model = tiny(gbst=False, downsample=1).eval()
    wrapper, _ = wrapper_for("charformer")
    hf = wrapper(ZerorayConfig(zeroray_model=model.config.model_dump(mode="json")))
    hf.model.load_state_dict(model.state_dict())
    hf.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**b).logits, model(**b).logits)
