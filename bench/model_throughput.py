"""Per-model training throughput in one process, and the architecture overheads, in one sitting.

Each arm is a model from a shipped tiny config (or a variant of one), trained with bf16 weights and
torch AdamW on random tokens of the config's shape and objective, on THREADS CPU threads. The arms
are interleaved round by round so drift hits them alike. Reports per arm: step time, tokens/s,
achieved FLOP/s (from `flops_per_token`; MFU is the bench's division by the measured peak) and the
peak resident-memory growth while the arm is built and trains its first step (weights, gradients,
Adam state, activations; `peak_rss`). The step-time ratios DHC×4 (mHC×4) ÷ residual and MoE top-2-of-8 ÷
dense with the same active parameters come from these rows.

    python bench/model_throughput.py all|ARM[,ARM…] ROUNDS STEPS THREADS     # prints one JSON line
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from peak_rss import peak_bytes, start_phase

import models
from trainer.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
MOE_8_TOP2 = "model.moe={num_experts: 8, top_k: 2, capacity_factor: 0.0}"
ARMS = {  # id: (label, config, overrides)
    "llama": ("llama (residual, dense)", "demo.yaml", []),
    "hc_dhc4": ("hc_llm DHC×4 (dense)", "hc_llm_tiny.yaml", []),
    "hc_shc4": ("hc_llm SHC×4 (dense)", "hc_llm_tiny.yaml", ["model.dynamic=false"]),
    "hc_mhc4": ("hc_llm mHC×4 (dense)", "hc_llm_mhc_tiny.yaml", []),
    "llama_moe": ("llama MoE top-2/8", "demo.yaml", [MOE_8_TOP2]),
    "hc_dhc4_moe": ("hc_llm DHC×4 MoE top-2/8", "hc_llm_moe_tiny.yaml", []),
    "widenet": ("widenet (MLM)", "widenet_tiny.yaml", []),
    "charformer": ("charformer (span corruption)", "charformer_tiny.yaml", []),
    "convbert": ("convbert (ELECTRA RTD)", "convbert_tiny.yaml", []),
    "bert": ("bert (ELECTRA RTD)", "bert_tiny.yaml", []),
}
BYTE_LEVEL = {"charformer"}  # keep their own byte vocabulary


def bench_spec(config: str, overrides: list[str]):
    """The config's spec without prepared data: byte tokenizer, and (but for byte-level models) the
    vocabulary of a trained 8k tokenizer."""
    spec = load_spec(REPO / "configs" / config, ["data.tokenizer=bytes", *overrides])
    if spec.model.name not in BYTE_LEVEL:
        spec = load_spec(REPO / "configs" / config,
                         ["data.tokenizer=bytes", "model.vocab_size=8192", *overrides])
    return spec


def random_batch(spec) -> dict:
    """Random tokens shaped by the spec's objective (masks, spans) like the data pipeline's batches."""
    text_vocab = spec.model.vocab_size - spec.data.special_tokens
    rng = np.random.default_rng(0)
    window, _ = spec.data.objective.window(spec.data.seq_len)
    windows = rng.integers(0, text_vocab - 1, size=(spec.trainer.micro_batch_size, window))
    return spec.data.objective.rows(windows, spec.data.seq_len, text_vocab, text_vocab - 1, rng)


def build(config: str, overrides: list[str]):
    """(model in bf16, its AdamW, one batch of the config's shape and objective, the spec); no data needed."""
    spec = bench_spec(config, overrides)
    torch.manual_seed(0)
    model = models.build(spec.model).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4, foreach=True)
    return model, opt, random_batch(spec), spec


def step(model, opt, batch) -> None:
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(arm_ids: list[str], rounds: int, steps: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    arms, growth = {}, {}
    for arm in arm_ids:
        before = start_phase()
        arms[arm] = build(*ARMS[arm][1:])
        step(*arms[arm][:3])  # warm-up; Adam's state now exists
        growth[arm] = peak_bytes() - before
    seconds = dict.fromkeys(arms, 0.0)
    for _ in range(rounds):
        for arm, (model, opt, batch, _) in arms.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step(model, opt, batch)
            seconds[arm] += time.perf_counter() - t0
    rows = []
    for arm, (model, _, _, spec) in arms.items():
        step_s = seconds[arm] / (rounds * steps)
        tokens = spec.trainer.micro_batch_size * spec.data.seq_len
        flops = spec.flops_per_token(model)
        rows.append({"arm": arm, "label": ARMS[arm][0], "config": ARMS[arm][1],
                     "params": model.num_parameters(), "active_params": model.num_active_parameters(),
                     "flops_per_token": flops, "step_s": step_s,
                     "tokens_per_s": tokens / step_s, "flop_per_s": tokens / step_s * flops,
                     "peak_rss_growth_bytes": growth[arm]})
    return rows


if __name__ == "__main__":
    ids = list(ARMS) if sys.argv[1] == "all" else sys.argv[1].split(",")
    unknown = sorted(set(ids) - set(ARMS))
    if unknown:
        sys.exit(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    print(json.dumps({"threads": int(sys.argv[4]), "rounds": int(sys.argv[2]), "steps": int(sys.argv[3]),
                      "rows": measure(ids, int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))}))
