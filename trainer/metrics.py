"""The metrics record of a logged step, and what it needs: MFU's denominator and memory per rank.

One record per logged step, written by rank 0 to metrics.jsonl (the launcher's trackers read it):
loss and auxiliary losses, the model's statistics, learning rate, gradient norm, throughput, MFU,
peak memory of every rank, the data counters of all ranks (`data/documents`, `data/tokens/<source>`,
`data/bad/<kind>`) and, on evaluation steps, the held-out loss (`trainer.evaluation`).
"""

from __future__ import annotations

import logging
import re
import resource
import sys
import time

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from data_pipelines import BatchStream
from trainer.evaluation import Evaluator
from trainer.spec import RunSpec

log = logging.getLogger("zeroray.metrics")

# Dense (no structured sparsity) peak FLOP/s per GPU from NVIDIA's datasheets; fp32 is the plain FP32
# rate (PyTorch leaves TF32 matmuls off by default). Keys match the CUDA device name as whole words;
# the longest matching key wins ("h100 pcie" over "h100"). Set trainer.peak_flops_per_worker for others.
_HALF_FP32 = {  # name: (bf16/fp16 tensor-core peak, fp32 peak)
    "h100": (989e12, 67e12),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    "h100 pcie": (756e12, 51e12),
    "h100 nvl": (835e12, 60e12),
    "h200": (989e12, 67e12),  # H200 SXM
    "h200 nvl": (835e12, 60e12),
    "gh200": (989e12, 67e12),
    "a100": (312e12, 19.5e12),  # SXM and PCIe, 40 and 80 GB
    "l40s": (362e12, 91.6e12),
    "l40": (181e12, 90.5e12),
    "l4": (121e12, 30.3e12),
    "a10": (125e12, 31.2e12),
    "a10g": (125e12, 31.2e12),  # AWS's A10 variant: NVIDIA publishes no datasheet; the A10's figures
}
GPU_PEAK_FLOPS: dict[str, dict[str, float]] = {
    name: {"bf16": half, "fp16": half, "fp32": fp32} for name, (half, fp32) in _HALF_FP32.items()
}
# No bf16 on these (pre-Ampere).
GPU_PEAK_FLOPS["v100"] = {"fp16": 125e12, "fp32": 15.7e12}  # SXM2
GPU_PEAK_FLOPS["t4"] = {"fp16": 65e12, "fp32": 8.1e12}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def gpu_peak_flops(device_name: str, precision: str) -> float | None:
    name = device_name.lower()
    known = [k for k in GPU_PEAK_FLOPS if re.search(rf"\b{re.escape(k)}\b", name)]
    if not known:
        return None
    return GPU_PEAK_FLOPS[max(known, key=len)].get(precision)


def measure_matmul_flops(dtype: torch.dtype, seconds: float = 0.3, size: int = 512) -> float:
    """Best matmul rate of this process (its torch threads) over ~`seconds`, in short slices so
    that a moment of contention does not count. bench/peak_flops.py is the longer version."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up: kernel selection, AMX tile set-up
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        runs, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds / 6 or runs < 2:
            a @ b
            runs += 1
        best = max(best, 2 * size**3 * runs / elapsed)
    return best


def peak_flops_per_worker(spec: RunSpec, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s of this worker, where the figure comes from); None where unknown."""
    if spec.trainer.peak_flops_per_worker:
        return spec.trainer.peak_flops_per_worker, "trainer.peak_flops_per_worker"
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        return measure_matmul_flops(DTYPES[precision]), f"measured: {precision} matmuls on this CPU"
    if accel.device_name() == "cuda":
        name = torch.cuda.get_device_name()
        return gpu_peak_flops(name, precision), f"datasheet figure for {name}, {precision}"
    return None, f"no figure for accelerator {accel.device_name()!r}"


def peak_memory_gb() -> float:
    """This process's high-water mark: allocated device memory on a GPU, resident memory on CPU."""
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        return accel.max_memory_allocated() / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def all_reduce_sum(values: dict[str, torch.Tensor | float], device: torch.device) -> dict[str, float]:
    """Sum scalars over ranks in one collective, then bring them to the host. float64: token and
    document counters pass float32's exact range (2^24) early in a run."""
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values.values()])
    dist.all_reduce(stacked)
    return dict(zip(values, stacked.tolist(), strict=True))


def model_statistics(model, world: int) -> dict:
    """The model's per-step statistics (e.g. MoE expert load) of the last micro-batch, under the
    model's own names: summed over ranks, and averaged for names ending in `fraction` or `_mean`."""
    stats = getattr(model, "step_statistics", dict)()
    out = {}
    for name, value in stats.items():
        value = value.detach().float().clone()
        dist.all_reduce(value)
        out[name] = (value / world if name.endswith(("fraction", "_mean")) else value).tolist()
    return out


class StepMetrics:
    """Accumulates the optimised losses between logged steps and builds each step's record.

    Collective: every rank builds the record of the same steps (rank 0 writes it)."""

    def __init__(self, spec: RunSpec, flops_per_token: float, precision: str, rank: int, world: int,
                 device: torch.device, started: float):
        self.spec, self.precision, self.rank, self.world = spec, precision, rank, world
        self.device, self.started = device, started
        self.flops_per_token = flops_per_token
        peak, source = peak_flops_per_worker(spec, precision)
        # NaN where any rank has no figure: then the sum is NaN and the record has no MFU.
        self.peak_total = all_reduce_sum({"peak": float("nan") if peak is None else peak}, device)["peak"]
        if self.peak_total != self.peak_total:
            self.peak_total = None
            if rank == 0:
                log.warning("no peak FLOP/s for this hardware (%s): records carry no mfu; set "
                            "trainer.peak_flops_per_worker", source)
        elif rank == 0:
            log.info("MFU denominator: %.4g FLOP/s over %d workers (rank 0: %s)", self.peak_total, world, source)
        self.loss_sum = torch.zeros((), device=device)
        self.aux_sums: dict[str, torch.Tensor] = {}
        # Throughput over the interval since the last record; checkpoint and evaluation time excluded.
        self.interval_steps, self.interval_t0, self.excluded_s = 0, time.perf_counter(), 0.0
        self.first = True

    def add(self, out) -> None:
        """One micro-batch's output."""
        self.loss_sum += out.loss.detach().float()
        for name, value in (out.aux_losses or {}).items():
            self.aux_sums[name] = self.aux_sums.get(name, 0.0) + value.detach().float()

    def step_done(self) -> None:
        self.interval_steps += 1

    def due(self, step: int) -> bool:
        return self.first or step == self.spec.trainer.max_steps or step % self.spec.trainer.log_every == 0

    def exclude(self, seconds: float) -> None:
        """Time spent on something other than training (a checkpoint), left out of throughput."""
        self.excluded_s += seconds

    def record(self, step: int, engine, scheduler, data: BatchStream, evaluator: Evaluator | None = None) -> dict:
        """The record of `step`, with the held-out loss when `evaluator` is given. The only host
        sync in the loop: once per logged step."""
        t = self.spec.trainer
        steps, seconds = self.interval_steps, time.perf_counter() - self.interval_t0 - self.excluded_s
        micro_batches = self.world * t.grad_accum_steps * steps
        statistics = model_statistics(engine.module, self.world)  # before evaluating: its forwards replace them
        held_out = evaluator.sums(engine) if evaluator is not None else {}
        # Peak memory of every rank through the same sum: each rank fills its own slot.
        memory = {f"memory/{r}": peak_memory_gb() if r == self.rank else 0.0 for r in range(self.world)}
        counters = data.metrics()  # cumulative, the same keys on every rank
        sums = all_reduce_sum({"loss": self.loss_sum, **self.aux_sums, **held_out, **memory, **counters}, self.device)
        aux = {f"aux/{k}": sums[k] / micro_batches for k in self.aux_sums}
        grad_norm = engine.get_global_grad_norm()
        tokens_per_s = self.spec.tokens_per_step * steps / seconds
        record = {
            "step": step,
            # The objective alone; auxiliary losses (already in the optimised total) are listed apart.
            "loss": (sums["loss"] - sum(v * micro_batches for v in aux.values())) / micro_batches,
            **aux,
            **statistics,
            **(Evaluator.metrics(sums) if held_out else {}),
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens_per_s": tokens_per_s,
            "mfu": None if self.peak_total is None else self.flops_per_token * tokens_per_s / self.peak_total,
            "memory/peak_gb": [sums[f"memory/{r}"] for r in range(self.world)],
            **{name: round(sums[name]) for name in counters},  # counts
            "step_time_s": seconds / steps,
            "tokens": step * self.spec.tokens_per_step,
            "max_steps": t.max_steps,
            "time": time.time(),
            "since_start_s": time.time() - self.started,
            "precision": self.precision,
        }
        self.loss_sum.zero_()
        self.aux_sums = {}
        self.interval_steps, self.interval_t0, self.excluded_s = 0, time.perf_counter(), 0.0
        self.first = False
        return record
