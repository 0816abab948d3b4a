"""ConvBERT and its BERT baseline, MLM and ELECTRA replaced-token detection: shapes, gradients, the
fixes to transformers' ConvBert (pad id, padding in the convolution, init), RTD labels, FLOPs, bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ConvBertConfig as HFConvBertConfig
from transformers import ConvBertForMaskedLM
from transformers.models.convbert.modeling_convbert import ConvBertEmbeddings, GroupedLinearLayer

import models
import models.convbert  # noqa: F401  (registers the families until models/__init__ imports it)
from models.convbert import BertConfig, ConvBertConfig, corrupt

V = 50  # the tokenizer's ids; the mlm objective appends pad = V and mask = V + 1
PAD, MASK = V, V + 1
FAMILIES = [("convbert", "rtd"), ("convbert", "mlm"), ("bert", "rtd"), ("bert", "mlm")]


def tiny(family: str = "convbert", **kw) -> nn.Module:
    torch.manual_seed(0)
    shape = dict(vocab_size=V + 2, d_model=32, n_layers=2, n_heads=4, embedding_size=16, max_seq_len=32,
                 generator_size=0.5)
    config_cls = ConvBertConfig if family == "convbert" else BertConfig
    return models.build(config_cls(**{**shape, **kw}))


def mlm_batch(batch: int = 2, length: int = 16, mask_prob: float = 0.25, seed: int = 0):
    """Random tokens with BERT's 80/10/10 masking, as the data pipeline's mlm objective makes them."""
    g = torch.Generator().manual_seed(seed)
    original = torch.randint(0, V, (batch, length), generator=g)
    selected = torch.rand(original.shape, generator=g) < mask_prob
    selected[:, 0] = True  # every row predicts something
    action = torch.rand(original.shape, generator=g)
    inputs = original.clone()
    inputs[selected & (action < 0.8)] = MASK
    randomised = selected & (action >= 0.8) & (action < 0.9)
    inputs[randomised] = torch.randint(0, V, (int(randomised.sum()),), generator=g)
    return inputs, torch.where(selected, original, -100)


@pytest.mark.parametrize("family,pretraining", FAMILIES)
def test_shapes_and_every_parameter_gets_a_gradient(family, pretraining):
    model = tiny(family, pretraining=pretraining)
    inputs, labels = mlm_batch(3, 16)
    out = model(inputs, labels=labels)
    assert out.logits.shape == ((3, 16) if pretraining == "rtd" else (3, 16, V + 2))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    if pretraining == "rtd":
        assert set(out.aux_losses) == {"generator_mlm"} and out.aux_losses["generator_mlm"] < out.loss
    else:
        assert out.aux_losses is None
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", ["convbert", "bert"])
def test_token_1_keeps_a_trainable_embedding(family):
    """transformers' default pad_token_id (ConvBert 1, Electra 0) would zero a real token's row."""
    model = tiny(family)
    embeddings = model.discriminator.embeddings
    assert embeddings.word_embeddings.padding_idx == PAD  # zeroray's pad id, absent from packed batches
    ids = torch.tensor([[1, 0, 2, 1]])
    probe = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0))
    (embeddings(input_ids=ids) * probe).sum().backward()
    grad = embeddings.word_embeddings.weight.grad
    assert embeddings.word_embeddings.weight[1].abs().sum() > 0
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() > 0
    # What the fix avoids: with transformers' default, the lookup of token 1 trains nothing.
    stock = ConvBertEmbeddings(HFConvBertConfig(vocab_size=8, embedding_size=16, max_position_embeddings=8))
    (stock(input_ids=ids) * probe).sum().backward()
    assert stock.word_embeddings.weight.grad[1].abs().sum() == 0


def test_padding_stays_out_of_the_convolution_branch():
    model = tiny(pretraining="mlm", dropout=0.0).eval()
    ids = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([ids, torch.full((1, 5), PAD)], dim=1)
    mask = (padded != PAD).long()
    stock = ConvBertForMaskedLM(model.mlm.config).eval()  # transformers' own layers, same weights
    stock.load_state_dict(model.mlm.state_dict())
    with torch.no_grad():
        alone = model(ids).logits
        in_batch = model(padded, attention_mask=mask).logits
        stock_alone = stock(ids).logits
        stock_in_batch = stock(padded, attention_mask=mask).logits
    torch.testing.assert_close(in_batch[:, :10], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stock_alone, alone, atol=1e-5, rtol=1e-4)  # the same network otherwise
    assert (stock_in_batch[:, :10] - alone).abs().max() > 1e-4  # transformers lets the padding in


def test_rtd_labels_count_a_sample_equal_to_the_original_as_original():
    original = torch.tensor([[5, 6, 7, 8, 9]])
    selected = torch.tensor([[True, False, True, True, False]])
    corrupted, replaced = corrupt(original, selected, torch.tensor([5, 3, 1]))
    assert corrupted.tolist() == [[5, 6, 3, 1, 9]]
    assert replaced.tolist() == [[False, False, True, True, False]]


def test_discriminator_loss_uses_the_sampled_replacements():
    """A generator that always samples token 7: the BCE target is "selected and original ≠ 7"."""
    model = tiny(pretraining="rtd")
    with torch.no_grad():
        model.generator.generator_lm_head.bias[7] = 1e4  # the MLM bias is not tied
    inputs, labels = mlm_batch(2, 16)
    labels[0, 0] = 7  # a selected position whose original token is the sample
    out = model(inputs, labels=labels)
    target = ((labels != -100) & (labels != 7)).float()
    bce = F.binary_cross_entropy_with_logits(out.logits.float(), target)
    torch.testing.assert_close(out.loss - out.aux_losses["generator_mlm"], 50.0 * bce, rtol=1e-5, atol=1e-4)
    selected = labels != -100
    assert model.step_statistics()["rtd/replaced_fraction"] == target[selected].mean()


@pytest.mark.parametrize("family,pretraining", FAMILIES)
def test_flops_per_token_matches_counted_matmuls(family, pretraining):
    """FlopCounterMode counts every matmul, convolution and — with SDPA's math backend, which it
    decomposes into bmm — the attention heads of a real forward+backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny(family, pretraining=pretraining)
    inputs, labels = mlm_batch(2, 16)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(inputs, labels=labels).loss.backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    if family == "convbert":
        # The counter's convolution_backward ignores `groups` for the weight gradient (a depthwise
        # convolution comes out C× too big); like a matmul's, it is twice the forward.
        assert counts["aten.convolution_backward"] > 2 * counts["aten.convolution"]
        counts["aten.convolution_backward"] = 2 * counts["aten.convolution"]
    counted = sum(counts.values()) / inputs.numel()
    assert model.flops_per_token(16) == pytest.approx(counted, rel=1e-9)


@pytest.mark.parametrize("family,pretraining", [("convbert", "rtd"), ("convbert", "mlm"), ("bert", "rtd")])
def test_loss_falls_on_a_fixed_batch(family, pretraining):
    model = tiny(family, pretraining=pretraining, dropout=0.0)
    inputs, labels = mlm_batch(2, 16, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, generator = [], []
    for _ in range(10):
        optimizer.zero_grad()
        out = model(inputs, labels=labels)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        generator.append(out.aux_losses["generator_mlm"].item() if out.aux_losses else out.loss.item())
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0], losses
    assert sum(generator[-3:]) / 3 < 0.85 * generator[0], generator  # the (generator's) MLM loss


@pytest.mark.parametrize("family", ["convbert", "bert"])
def test_bf16_forward_is_close_to_fp32(family):
    model = tiny(family).eval()
    inputs, labels = mlm_batch(2, 16)
    with torch.no_grad():
        ref, ref_logits = model(inputs, labels=labels), model(inputs).logits
        model.to(torch.bfloat16)
        low, low_logits = model(inputs, labels=labels), model(inputs).logits
    assert low.loss.dtype == torch.float32  # losses are computed in fp32
    assert abs(ref.aux_losses["generator_mlm"].item() - low.aux_losses["generator_mlm"].item()) < 0.05
    assert (low_logits.float() - ref_logits).abs().max() < 0.05


def test_convbert_has_fewer_parameters_than_bert_of_the_same_shape():
    """Exact count of the ConvBERT network; BERT of the same width/depth is bigger (the paper's claim)."""
    d, e, ff, k, groups, layers, vocab, positions = 32, 16, 128, 9, 2, 2, V + 2, 32
    conv = tiny(pretraining="mlm", num_groups=groups, d_ff=ff)
    bert = tiny("bert", pretraining="mlm", d_ff=ff)
    a, conv_heads = d // 2, 4 // 2  # attention and convolution each get half of d_model
    mixed_attention = (3 * (d * a + a)  # query, key, value
                       + d * k + d * a + a  # span-aware key: depthwise, pointwise, bias
                       + a * conv_heads * k + conv_heads * k  # kernel generator W_f
                       + d * a + a)  # convolution values
    attention_block = d * d + d + 2 * d  # output projection, LayerNorm
    ffn = d * ff // groups + ff + ff * d // groups + d + 2 * d
    embeddings = vocab * e + positions * e + e + 2 * e + e * d + d  # words, positions, 1 type, norm, projection
    head = d * e + e + 2 * e + vocab  # dense, LayerNorm, decoder bias (decoder tied)
    assert conv.num_parameters() == embeddings + layers * (mixed_attention + attention_block + ffn) + head
    assert conv.num_parameters() < bert.num_parameters()
    assert conv.num_active_parameters() == conv.num_parameters()


def test_grouped_ffn_and_depthwise_convolution_are_initialised():
    model = tiny(pretraining="mlm", num_groups=2, d_ff=128, init_std=0.02)
    grouped = [m for m in model.modules() if isinstance(m, GroupedLinearLayer)]
    assert len(grouped) == 4  # intermediate and output of both layers
    for m in grouped:  # torch.empty until post_init: must come out N(0, init_std), zero bias
        assert abs(m.weight.std().item() - 0.02) < 0.002 and m.bias.abs().sum() == 0
    for name, p in model.named_parameters():
        if name.endswith("depthwise.weight"):  # the paper's code: std 1/kernel
            assert abs(p.std().item() - 1 / 9) < 0.03, name


@pytest.mark.parametrize("pretraining", ["rtd", "mlm"])
def test_tied_parameters_share_storage(pretraining):
    model = tiny(pretraining=pretraining)
    tied = model.tied_parameters()
    params = dict(model.named_parameters(remove_duplicate=False))
    assert tied and all(params[a] is params[b] for a, b in tied.items())
    if pretraining == "rtd":
        assert tied["generator.generator_lm_head.weight"] == "discriminator.embeddings.word_embeddings.weight"
        assert tied["generator.convbert.embeddings.position_embeddings.weight"] == (
            "discriminator.embeddings.position_embeddings.weight")
    else:
        assert tied == {"mlm.generator_lm_head.weight": "mlm.convbert.embeddings.word_embeddings.weight"}


def test_weight_decay_groups_cover_each_parameter_once():
    model = tiny()
    decay, no_decay = model.param_groups(0.1)
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(not names[id(p)].endswith("bias") and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert any(names[id(p)].endswith("key_conv_attn_layer.bias") for p in no_decay["params"])  # a [C, 1] bias
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_activation_checkpointing_gives_the_same_gradients():
    inputs, labels = mlm_batch(2, 16)
    grads = []
    for checkpointed in (False, True):
        model = tiny(pretraining="mlm", dropout=0.0)
        if checkpointed:
            model.enable_activation_checkpointing()
        model(inputs, labels=labels).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_sequence_longer_than_max_is_refused():
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny()(torch.zeros(1, 33, dtype=torch.long), labels=torch.zeros(1, 33, dtype=torch.long))


def test_shapes_that_do_not_split_are_refused():
    with pytest.raises(ValueError, match="num_groups"):
        ConvBertConfig(vocab_size=52, d_model=32, n_heads=4, num_groups=3)
    with pytest.raises(ValueError, match="conv_kernel_size"):
        ConvBertConfig(vocab_size=52, d_model=32, n_heads=4, conv_kernel_size=8)
    with pytest.raises(ValueError, match="generator: d_model 19"):
        BertConfig(vocab_size=52, d_model=64, n_heads=8, generator_size=0.3)  # 19 wide, 2 heads
    BertConfig(vocab_size=52, d_model=64, n_heads=8, generator_size=0.3, pretraining="mlm")  # no generator
