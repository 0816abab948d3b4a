"""Per-model training throughput in one process, and the architecture overheads, in one sitting.

Each arm is a model from a shipped config (or a variant of one), trained with bf16 weights and
torch AdamW on random tokens of the config's shape and objective, on `--threads` CPU threads. The arms are
interleaved round by round so drift hits them alike. Reports tokens/s, achieved FLOP/s from
`flops_per_token`, and step-time ratios: DHC×4 ÷ residual, MoE top-2-of-8 ÷ dense with the same
active parameters.

    .venv/bin/python bench/model_throughput.py [--rounds 3] [--steps 5] [--threads 1]

Writes bench/results/<date>-models.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from peak_flops import peak
from results_file import save

import models
from launcher.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
MOE_8_TOP2 = "model.moe={num_experts: 8, top_k: 2, capacity_factor: 0.0}"
ARMS = {
    "llama (residual, dense)": ("demo.yaml", []),
    "hc_llm DHC×4 (dense)": ("hc_llm_tiny.yaml", []),
    "hc_llm SHC×4 (dense)": ("hc_llm_tiny.yaml", ["model.dynamic=false"]),
    "llama MoE top-2/8": ("demo.yaml", [MOE_8_TOP2]),
    "hc_llm DHC×4 MoE top-2/8": ("hc_llm_moe_tiny.yaml", []),
    "widenet (MLM)": ("widenet_tiny.yaml", []),
    "charformer (span corruption)": ("charformer_tiny.yaml", []),
    "convbert (ELECTRA RTD)": ("convbert_tiny.yaml", []),
    "bert (ELECTRA RTD)": ("bert_tiny.yaml", []),
}
BYTE_LEVEL = {"charformer"}  # keep their own byte vocabulary


def build(config: str, overrides: list[str]):
    spec = load_spec(REPO / "configs" / config, ["data.tokenizer=bytes", *overrides])
    if spec.model.name not in BYTE_LEVEL:  # the vocabulary of a trained tokenizer, without preparing data
        spec = load_spec(REPO / "configs" / config, ["data.tokenizer=bytes", "model.vocab_size=8192", *overrides])
    torch.manual_seed(0)
    model = models.build(spec.model).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4, foreach=True)
    # Random tokens shaped by the config's objective (masks, spans) like the data pipeline's batches.
    text_vocab = spec.model.vocab_size - spec.data.special_tokens
    rng = np.random.default_rng(0)
    window, _ = spec.data.objective.window(spec.data.seq_len)
    windows = rng.integers(0, text_vocab - 1, size=(spec.trainer.micro_batch_size, window))
    batch = spec.data.objective.rows(windows, spec.data.seq_len, text_vocab, text_vocab - 1, rng)
    return model, opt, batch, spec


def step(model, opt, batch) -> None:
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arms = {name: build(*cfg) for name, cfg in ARMS.items()}
    for model, opt, batch, _ in arms.values():
        step(model, opt, batch)  # warm-up
    seconds = {name: 0.0 for name in arms}
    for _ in range(args.rounds):
        for name, (model, opt, batch, _) in arms.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(model, opt, batch)
            seconds[name] += time.perf_counter() - t0
    bf16_peak = peak(torch.bfloat16)["flop_per_s"]  # MFU's denominator, measured in this sitting
    rows = []
    for name, (model, _, _, spec) in arms.items():
        step_s = seconds[name] / (args.rounds * args.steps)
        tokens = spec.trainer.micro_batch_size * spec.data.seq_len
        rows.append({
            "arm": name, "params": model.num_parameters(), "active_params": model.num_active_parameters(),
            "flops_per_token": spec.flops_per_token(model), "step_s": step_s,
            "tokens_per_s": tokens / step_s, "flop_per_s": tokens / step_s * spec.flops_per_token(model),
            "mfu": tokens / step_s * spec.flops_per_token(model) / bf16_peak,
        })
    by = {r["arm"]: r for r in rows}
    ratios = {
        "dhc4_over_residual": by["hc_llm DHC×4 (dense)"]["step_s"] / by["llama (residual, dense)"]["step_s"],
        "shc4_over_residual": by["hc_llm SHC×4 (dense)"]["step_s"] / by["llama (residual, dense)"]["step_s"],
        "moe_top2of8_over_dense": by["llama MoE top-2/8"]["step_s"] / by["llama (residual, dense)"]["step_s"],
    }
    out = save("models", {"threads": args.threads, "rounds": args.rounds, "steps": args.steps, "rows": rows,
                          "ratios": ratios, "bf16_peak_flop_per_s": bf16_peak})
    print(f"bf16 matmul peak, {args.threads} thread(s), measured now: {bf16_peak / 1e9:.0f} GFLOP/s\n")
    print("| arm | params | active | FLOPs/token | step (s) | tokens/s | GFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.2f}M | {r['flops_per_token']:.3g} "
              f"| {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['flop_per_s'] / 1e9:.1f} | {r['mfu']:.1%} |")
    print("\n" + "\n".join(f"{k}: {v:.3f}" for k, v in ratios.items()))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
