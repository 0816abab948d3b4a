"""The realistic configs (125M–1B class) on this CPU: one forward + backward each, bf16 weights.

These configs are meant for GPU clusters; here they show that each builds, runs and what a step
costs, not a training speed. One sequence per step at the config's seq_len; no optimizer step (Adam's
fp32 moments of the 1B models would not fit next to everything else in 24 GiB). The OLMoE-shaped
6.75B config is left out: its bf16 weights and gradients alone are 27 GB.

    .venv/bin/python bench/realistic_models.py [--threads 2]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from model_throughput import build
from peak_flops import peak
from results_file import save

CONFIGS = ["llama_1b.yaml", "hc_llm_1b.yaml", "widenet_base.yaml", "charformer_base.yaml", "convbert_base.yaml"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bf16_peak = peak(torch.bfloat16)["flop_per_s"]
    rows = []
    for config in CONFIGS:
        model, _, batch, spec = build(config, ["trainer.micro_batch_size=1"])
        model(**batch).loss.backward()  # warm-up: allocations, kernel selection
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(**batch).loss.backward()
        seconds = time.perf_counter() - start
        tokens = spec.data.seq_len
        flops = spec.flops_per_token(model)
        rows.append({"config": config, "params": model.num_parameters(), "active_params": model.num_active_parameters(),
                     "seq_len": tokens, "flops_per_token": flops, "fwd_bwd_s": seconds,
                     "tokens_per_s": tokens / seconds,
                     # forward + backward are 2/3 of a training step's 6·N FLOPs per token
                     "mfu_fwd_bwd": tokens / seconds * flops * 2 / 3 / bf16_peak})
        print(f"| {config} | {rows[-1]['params'] / 1e6:.0f}M | {rows[-1]['active_params'] / 1e6:.0f}M | {flops:.3g} "
              f"| {seconds:.1f} | {rows[-1]['tokens_per_s']:.0f} | {rows[-1]['mfu_fwd_bwd']:.1%} |", flush=True)
        del model, batch
        gc.collect()
    out = save("realistic", {"threads": args.threads, "bf16_peak_flop_per_s": bf16_peak, "rows": rows})
    print(f"bf16 peak {bf16_peak / 1e9:.0f} GFLOP/s on {args.threads} threads; written to {out}")


if __name__ == "__main__":
    main()
