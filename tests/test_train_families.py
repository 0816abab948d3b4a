"""Each model family trains through `zeroray train`'s launcher on an embedded Ray cluster (2 workers,
real DeepSpeed ZeRO on gloo), its loss falls, and its export opens in `transformers` with the same logits."""

from __future__ import annotations

import json
import math

import pytest

from launcher.ray_launch import launch
from tests.export_check import check_export
from trainer.spec import load_spec

pytestmark = pytest.mark.slow


def train(config, overrides: list[str]) -> tuple[list[dict], object]:
    spec = load_spec(config, overrides)
    result = launch(spec, announce=lambda s: None)
    lines = (result.run.root / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], result


def falls(recs: list[dict], by: float) -> bool:
    first, last = (sum(r["loss"] for r in part) / 3 for part in (recs[:3], recs[-3:]))
    return last < first - by


WIDENET = ["model={name: widenet, d_model: 64, n_layers: 3, n_heads: 4, max_seq_len: 64}",
           "data.objective={kind: mlm}", "trainer.lr=3e-3"]


@pytest.mark.parametrize("stage, recompute", [(2, True), (3, False)])
def test_widenet_trains_under_zero_with_shared_weights(ray_local, tiny_config, tmp_path, stage, recompute):
    """ZeRO-2 + activation checkpointing over shared weights (DeepSpeed #988's 'gradient computed
    twice'), and ZeRO-3 fetching one module's partitions for each of its L uses."""
    recs, result = train(tiny_config, [*WIDENET, f"trainer.zero_stage={stage}",
                                       f"trainer.activation_checkpointing={str(recompute).lower()}",
                                       "trainer.max_steps=16", "trainer.checkpoint_every=0",
                                       f"output.name=widenet-{stage}"])
    assert falls(recs, 0.3), [r["loss"] for r in recs]
    for r in recs:  # three uses of the shared MoE per forward, each ≥ α · 1 at perfect balance
        assert r["aux/load_balance"] >= 3 * 0.01 * 0.99
        assert sum(r["moe/tokens_per_expert"]) == pytest.approx(
            2 * 3 * 4 * 32 * 2 * (1 - r["moe/dropped_fraction"]), rel=1e-4)
    check_export(result.run.root, tmp_path / "hf", last_loss=recs[-1]["loss"])


def test_charformer_trains_with_span_corruption_under_zero3(ray_local, tiny_config, tmp_path):
    """Bytes → GBST → encoder, byte decoder; the shared byte embedding is used by both sides (one
    module gathered twice per step under ZeRO-3)."""
    recs, result = train(tiny_config, [
        "model={name: charformer, d_model: 64, n_heads: 4, n_encoder_layers: 2, n_decoder_layers: 1, "
        "max_seq_len: 64}",
        "data.tokenizer=bytes", "data.seq_len=64", "data.objective={kind: span_corruption, mean_span_length: 5}",
        "trainer.zero_stage=3", "trainer.max_steps=16", "trainer.checkpoint_every=0", "output.name=charformer",
    ])
    assert result.run.root.joinpath("spec.yaml").read_text().count("vocab_size: 261") == 1  # 257 + pad, mask, 2 sentinels
    assert falls(recs, 0.5), [r["loss"] for r in recs]
    check_export(result.run.root, tmp_path / "hf", last_loss=recs[-1]["loss"])


def test_convbert_trains_with_replaced_token_detection(ray_local, tiny_config, tmp_path):
    """ELECTRA: the generator's MLM loss is reported apart; the objective is λ·BCE of the discriminator."""
    recs, result = train(tiny_config, [
        "model={name: convbert, d_model: 64, n_layers: 2, n_heads: 4, embedding_size: 32, max_seq_len: 64, "
        "generator_size: 0.5, dropout: 0.0}",
        "data.objective={kind: mlm}", "trainer.max_steps=16", "trainer.checkpoint_every=0",
        "output.name=convbert",
    ])
    chance = math.log(512)  # the test tokenizer's vocabulary
    assert recs[-1]["aux/generator_mlm"] < min(recs[0]["aux/generator_mlm"], chance) - 0.1
    assert falls(recs, 1.0), [r["loss"] for r in recs]
    assert all(0 < r["rtd/replaced_fraction"] <= 1 for r in recs)  # of the selected positions
    check_export(result.run.root, tmp_path / "hf", last_loss=recs[-1]["loss"])


def test_llama_moe_trains_with_expert_parallelism(ray_local, tiny_config, tmp_path):
    """trainer.expert_parallel=2: each worker holds half of every MoE layer's experts and tokens travel
    to them by all-to-all; the export is the plain model with every expert, giving the same logits."""
    recs, result = train(tiny_config, [
        "model.moe={num_experts: 4, top_k: 2}", "trainer.expert_parallel=2", "trainer.zero_stage=2",
        "trainer.max_steps=16", "trainer.checkpoint_every=0", "output.name=llama-ep",
    ])
    assert falls(recs, 0.3), [r["loss"] for r in recs]
    for r in recs:  # dropless: 2 layers × 2 workers × 4 × 32 tokens × top-2, each counted once
        assert sum(r["moe/tokens_per_expert"]) == 2 * 2 * 4 * 32 * 2 and r["moe/dropped_fraction"] == 0
    step = result.run.root / "checkpoints" / "step_00000016"
    assert len(list(step.glob("layer_*_expert_*_model_states.pt"))) == 2 * 4  # DeepSpeed saved every expert
    check_export(result.run.root, tmp_path / "hf", last_loss=recs[-1]["loss"])
