"""Per-document attention in packed causal rows (`segment_ids`): llama and hc_llm."""

from __future__ import annotations

import pytest
import torch

import models
from models.llama import HCLLMConfig, LlamaConfig

SHAPE = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
CONFIGS = {"llama": LlamaConfig(**SHAPE), "hc_llm": HCLLMConfig(**SHAPE, rate=4, dynamic=True)}
FIRST, SECOND = 9, 15  # document lengths in the packed row


def build(name: str):
    torch.manual_seed(0)
    model = models.build(CONFIGS[name])
    with torch.no_grad():  # away from the initialisation, where DHC's dynamic mixing is still zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def packed_batch():
    """Row 0: two documents; row 1: one document filling the row (plain causal attention)."""
    torch.manual_seed(1)
    first, second = torch.randint(0, 97, (1, FIRST)), torch.randint(0, 97, (1, SECOND))
    whole = torch.randint(0, 97, (1, FIRST + SECOND))
    ids = torch.cat([torch.cat([first, second], 1), whole])
    segments = torch.tensor([[0] * FIRST + [1] * SECOND, [0] * (FIRST + SECOND)])
    return ids, segments, first, second


@pytest.mark.parametrize("name", CONFIGS)
def test_each_packed_document_gets_the_logits_it_has_alone(name):
    model = build(name).eval()
    ids, segments, first, second = packed_batch()
    with torch.no_grad():
        packed = model(ids, segment_ids=segments).logits
        unmasked = model(ids).logits
        alone = model(first).logits, model(second).logits
    torch.testing.assert_close(packed[0, :FIRST], alone[0][0], rtol=1e-5, atol=1e-5)
    # The second document sits at positions 9.. in the row and 0.. alone, with no position reset:
    # equal because rotary attention depends only on query–key distances.
    torch.testing.assert_close(packed[0, FIRST:], alone[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[1], unmasked[1], rtol=1e-5, atol=1e-5)  # one document = causal
    assert (unmasked[0, FIRST:] - alone[1][0]).abs().max() > 1e-3  # without the mask it sees the first


def packed_gradients(name: str, checkpointing: bool):
    """Under bf16 autocast: a loss on the second document of row 0 → (gradient at the embedding
    output, parameter gradients, the packed and the lone logits of that document)."""
    ids, segments, _, second = packed_batch()
    model = build(name).train()
    if checkpointing:
        model.enable_activation_checkpointing()
    embedded = []

    def keep_grad(_module, _inputs, out):
        out.retain_grad()
        embedded.append(out)

    model.embed.register_forward_hook(keep_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids, segment_ids=segments).logits
        alone = model(second).logits
    assert logits.dtype == torch.bfloat16
    logits[0, FIRST:].float().square().sum().backward()
    params = {n: p.grad for n, p in model.named_parameters()}
    return embedded[0].grad, params, logits[0, FIRST:].float(), alone[0].float()


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_stay_within_documents_under_bf16_autocast_and_checkpointing(name):
    grad, params, packed, alone = packed_gradients(name, checkpointing=False)
    # bf16 rounding differs between the two layouts; the document's logits still agree closely.
    assert (packed - alone).abs().max() < 0.05
    assert torch.equal(grad[0, :FIRST], torch.zeros_like(grad[0, :FIRST]))  # nothing reaches the first
    assert grad[0, FIRST:].abs().sum() > 0 and torch.equal(grad[1], torch.zeros_like(grad[1]))
    assert all(g is not None for g in params.values())
    ckpt_grad, ckpt_params, _, _ = packed_gradients(name, checkpointing=True)
    torch.testing.assert_close(ckpt_grad, grad)
    for n, g in params.items():
        torch.testing.assert_close(ckpt_params[n], g, msg=n)


def test_segment_ids_of_another_shape_are_refused():
    model = build("llama")
    with pytest.raises(ValueError, match=r"segment_ids must be integer ids shaped \(2, 24\) .*got torch.int64 \(2, 23\)"):
        model(torch.zeros(2, 24, dtype=torch.long), segment_ids=torch.zeros(2, 23, dtype=torch.long))
