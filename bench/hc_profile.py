"""Where hyper-connections spend their time: Pre-Norm residual vs SHC×4, DHC×4 and mHC×4 at the tiny shapes.

Two parts, one process, one CPU thread:
1. step-time ratios: the four arms (shapes of configs/demo.yaml and configs/hc_llm_tiny.yaml,
   bf16 weights + AdamW as in bench/model_throughput.py) run alternately, round by round, so load from
   other processes on the machine hits them alike; the ratios to the residual arm are what to compare.
2. torch.profiler of one forward + backward per arm: the top ops by self CPU time.

`--precision bf16` is what the trainer runs (DeepSpeed bf16: bf16 weights); `autocast` keeps fp32
weights under `torch.autocast(bfloat16)`; `fp32` is fp32 throughout, for CPUs without bf16 matmul
instructions (AVX2 only: there bf16 matmuls run ~50× slower than fp32 ones and hide the mixing).
`--arms` picks some of the arms (the residual one is always run: the ratios are to it).

    .venv/bin/python bench/hc_profile.py [--rounds 5] [--steps 2] [--top 15] [--precision bf16|autocast|fp32]
                                         [--arms mHC×4,DHC×4]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from model_throughput import build, step
from torch.profiler import ProfilerActivity, profile

ARMS = {
    "residual": ("demo.yaml", []),
    "SHC×4": ("hc_llm_tiny.yaml", ["model.dynamic=false"]),
    "DHC×4": ("hc_llm_tiny.yaml", []),
    "mHC×4": ("hc_llm_mhc_tiny.yaml", []),
}


def precision_context(precision: str):
    if precision == "autocast":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_arm(config: str, overrides: list[str], precision: str):
    model, opt, batch, _ = build(config, overrides)
    if precision in ("autocast", "fp32"):  # fp32 weights (autocast: its context casts the matmuls)
        model.float()
        opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4, foreach=True)
    return model, opt, batch


def saved_for_backward_mib(model, batch) -> float:
    """Activation memory of one forward: the distinct storages autograd keeps for the backward,
    the weights' own excluded."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return sum(storages.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="training steps per arm and round")
    parser.add_argument("--top", type=int, default=15, help="ops listed per arm (0 = no profile)")
    parser.add_argument("--precision", choices=["bf16", "autocast", "fp32"], default="bf16")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated, of: " + ", ".join(ARMS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    chosen = ["residual", *(a for a in args.arms.split(",") if a != "residual")]
    unknown = sorted(set(chosen) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    arms = {name: make_arm(*ARMS[name], args.precision) for name in chosen}
    with precision_context(args.precision):
        for model, opt, batch in arms.values():
            step(model, opt, batch)  # warm-up: allocations, kernel choice, compilation
        seconds = {name: [] for name in arms}
        for _ in range(args.rounds):
            for name, (model, opt, batch) in arms.items():
                # CPU time of this process, not wall time: on a shared machine the wall clock also
                # counts the time other processes held the core.
                t0 = time.process_time()
                for _ in range(args.steps):
                    step(model, opt, batch)
                seconds[name].append((time.process_time() - t0) / args.steps)
    base = seconds["residual"]
    print(f"precision {args.precision}, {args.rounds} rounds × {args.steps} steps, CPU time per step")
    print("step time ÷ residual, per round (median):")
    for name, times in seconds.items():
        ratios = sorted(t / b for t, b in zip(times, base, strict=True))
        print(f"  {name:9s} {' '.join(f'{r:.3f}' for r in ratios)}   median {ratios[len(ratios) // 2]:.3f}"
              f"   (residual step {sorted(base)[len(base) // 2]:.3f} s)" if name == "residual" else
              f"  {name:9s} {' '.join(f'{r:.3f}' for r in ratios)}   median {ratios[len(ratios) // 2]:.3f}")
    with precision_context(args.precision):
        memory = {name: saved_for_backward_mib(model, batch) for name, (model, _, batch) in arms.items()}
    print("saved for backward (MiB): " + ", ".join(f"{name} {mib:.0f}" for name, mib in memory.items()))
    if not args.top:
        return
    for name, (model, _, batch) in arms.items():
        with precision_context(args.precision), profile(activities=[ProfilerActivity.CPU]) as prof:
            model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)
        print(f"\n=== {name}: forward + backward, top {args.top} ops by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
