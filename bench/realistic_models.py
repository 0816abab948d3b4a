"""The realistic configs (100M–1B class) on this CPU: one forward + backward each, bf16 weights.

These configs are meant for GPU clusters; here they show that each builds, runs, what a step costs
and how much memory it takes, not a training speed. One sequence per step at the config's seq_len;
no optimizer step (Adam's fp32 moments of the 1B models would not fit next to everything else in
24 GiB). The warm-up (allocations, kernel selection) runs on a short sequence, so that the big
models pay their long step once. The OLMoE-shaped 6.75B config is left out: its bf16 weights and
gradients alone are 27 GB. Peak memory: the resident-memory growth from before the model is built
to the end of its measured step (`peak_rss`).

    python bench/realistic_models.py THREADS all|CONFIG[,CONFIG…]     # prints one JSON line
"""

from __future__ import annotations

import gc
import json
import sys
import time

import torch
from model_throughput import bench_spec, build, random_batch
from peak_rss import peak_bytes, start_phase

CONFIGS = ("llama_100m.yaml", "llama_1b.yaml", "hc_llm_1b.yaml", "widenet_base.yaml", "charformer_base.yaml",
           "convbert_base.yaml")
WARMUP_SEQ_LEN = 128


def measure(config: str) -> dict:
    before = start_phase()
    model, _, batch, spec = build(config, ["trainer.micro_batch_size=1"])
    short = bench_spec(config, ["trainer.micro_batch_size=1", f"data.seq_len={WARMUP_SEQ_LEN}"])
    warmup = random_batch(short)
    model(**warmup).loss.backward()
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    model(**batch).loss.backward()
    seconds = time.perf_counter() - start
    tokens, flops = spec.data.seq_len, spec.flops_per_token(model)
    row = {"config": config, "params": model.num_parameters(), "active_params": model.num_active_parameters(),
           "seq_len": tokens, "flops_per_token": flops, "fwd_bwd_s": seconds,
           "tokens_per_s": tokens / seconds,
           # forward + backward are 2/3 of a training step's FLOPs
           "flop_per_s": tokens / seconds * flops * 2 / 3, "peak_rss_growth_bytes": peak_bytes() - before}
    del model, batch
    gc.collect()
    return row


if __name__ == "__main__":
    threads = int(sys.argv[1])
    torch.set_num_threads(threads)
    configs = CONFIGS if sys.argv[2] == "all" else sys.argv[2].split(",")
    print(json.dumps({"threads": threads, "rows": [measure(c) for c in configs]}))
