"""This machine's peak matmul FLOP/s per dtype: the denominator of MFU, measured, not looked up.

Square matmuls of a few sizes on `--threads` threads; the best sustained rate counts as the peak
(2·n³ FLOPs per n×n×n product). `model_throughput.py` divides each model's achieved FLOP/s by it.

    .venv/bin/python bench/peak_flops.py [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

SIZES = (1024, 2048, 4096)


def matmul_flops_per_s(dtype: torch.dtype, size: int, seconds: float = 1.0) -> float:
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up (kernel selection, AMX tile configuration)
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or runs < 2:
        a @ b
        runs += 1
    return 2 * size**3 * runs / elapsed


def peak(dtype: torch.dtype) -> dict:
    rates = {size: matmul_flops_per_s(dtype, size) for size in SIZES}
    return {"flop_per_s": max(rates.values()), "by_size": rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for dtype in (torch.bfloat16, torch.float32):
        p = peak(dtype)
        sizes = ", ".join(f"{n}: {r / 1e9:.0f}" for n, r in p["by_size"].items())
        print(f"{dtype}: peak {p['flop_per_s'] / 1e9:.0f} GFLOP/s on {args.threads} thread(s) ({sizes})")


if __name__ == "__main__":
    main()
