"""Decoding speed with and without the key/value cache, per tiny decoder config (greedy, batch 1).

`models.sampling.generate` (what `zeroray sample` and `eval.sample_prompts` run, and what the
remote-code exports' `generate()` does through the same attention layers) against the same loop
running the whole prefix each step; both arms decode the same tokens (checked), alternately, round by
round, in one process on one CPU thread, fp32 weights (random: speed does not depend on them).

    .venv/bin/python bench/generate_speed.py [--prompt 8] [--new 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from model_throughput import bench_spec

import models
from models.sampling import generate

CONFIGS = {  # label: (config, overrides)
    "llama (demo)": ("demo.yaml", []),
    "DHC×4": ("hc_llm_tiny.yaml", []),
    "mHC×4": ("hc_llm_mhc_tiny.yaml", []),
    "llama MoE": ("llama_moe_tiny.yaml", []),
}


@torch.no_grad()
def without_cache(module, ids: torch.Tensor, new: int) -> torch.Tensor:
    for _ in range(new):
        ids = torch.cat([ids, module(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=8, help="prompt tokens")
    parser.add_argument("--new", type=int, default=200, help="new tokens per decode")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'model':14} {'cache tok/s':>12} {'no cache tok/s':>15} {'speed-up':>9}")
    for label, (config, overrides) in CONFIGS.items():
        spec = bench_spec(config, overrides)
        torch.manual_seed(0)
        module = models.build(spec.model).float().eval()
        if not module.config.kv_cache_layers:
            print(f"{label:14} (no cache: kv_cache_layers is 0)")
            continue
        ids = torch.randint(0, module.config.vocab_size, (1, args.prompt))
        cached = generate(module, ids, args.new, temperature=0)
        assert torch.equal(cached, without_cache(module, ids, args.new)), f"{label}: cached tokens differ"
        seconds = {"cache": 0.0, "none": 0.0}
        for _ in range(args.rounds):
            start = time.perf_counter()
            generate(module, ids, args.new, temperature=0)
            seconds["cache"] += time.perf_counter() - start
            start = time.perf_counter()
            without_cache(module, ids, args.new)
            seconds["none"] += time.perf_counter() - start
        rate = {k: args.new * args.rounds / s for k, s in seconds.items()}
        print(f"{label:14} {rate['cache']:12.1f} {rate['none']:15.1f} {rate['cache'] / rate['none']:8.2f}×")


if __name__ == "__main__":
    main()
