"""This machine's peak matmul FLOP/s per dtype and thread count: the denominator of MFU, measured
in the same sitting as the runs it divides, not looked up.

Square matmuls of a few sizes; the best sustained rate counts as the peak (2·n³ FLOPs per n×n×n
product). Prints one JSON line: {dtype: {threads: FLOP/s}}.

    python bench/peak_flops.py THREADS[,THREADS…] DTYPE[,DTYPE…] SECONDS_PER_SIZE
"""

from __future__ import annotations

import json
import sys
import time

import torch

SIZES = (1024, 2048, 4096)


def matmul_flops_per_s(dtype: torch.dtype, size: int, seconds: float) -> float:
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up (kernel selection, AMX tile configuration)
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or runs < 2:
        a @ b
        runs += 1
    return 2 * size**3 * runs / elapsed


def peak(dtype: torch.dtype, seconds: float = 1.0) -> dict:
    """On the threads torch uses now: {"flop_per_s": best rate, "by_size": {n: rate}}."""
    rates = {size: matmul_flops_per_s(dtype, size, seconds) for size in SIZES}
    return {"flop_per_s": max(rates.values()), "by_size": rates}


def main(threads: list[int], dtypes: list[str], seconds: float) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in dtypes:
        for n in threads:
            torch.set_num_threads(n)
            out.setdefault(name, {})[str(n)] = peak(getattr(torch, name), seconds)["flop_per_s"]
    return out


if __name__ == "__main__":
    threads, dtypes, seconds = sys.argv[1:4]
    print(json.dumps(main([int(n) for n in threads.split(",")], dtypes.split(","), float(seconds))))
