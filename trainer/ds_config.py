"""The DeepSpeed config, derived from the run spec (never written by hand)."""

from __future__ import annotations

from typing import Any

import torch
from deepspeed.accelerator import get_accelerator

from trainer.spec import RunSpec


def bf16_supported() -> bool:
    """True where bf16 matmuls are native: Ampere+ GPUs, or CPUs with AVX512-BF16/AMX."""
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(accel.is_bf16_supported())


def resolve_precision(spec: RunSpec) -> str:
    if spec.trainer.precision == "auto":
        return "bf16" if bf16_supported() else "fp32"
    return spec.trainer.precision


def deepspeed_config(spec: RunSpec, precision: str) -> dict[str, Any]:
    t = spec.trainer
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": spec.global_batch_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": list(t.betas),
                "eps": t.eps,
                "weight_decay": t.weight_decay,
                # torch AdamW (foreach) instead of DeepSpeed's FusedAdam,
                # which needs a CUDA build of its op; DeepSpeed knows torch AdamW under ZeRO.
                "torch_adam": True,
                "adam_w_mode": True,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.max_steps,
                "warmup_num_steps": t.warmup_steps,
                "warmup_type": "linear",
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": t.min_lr_ratio,
            },
        },
        "steps_per_print": 10**9,  # zeroray logs its own metrics
        "wall_clock_breakdown": False,
    }
    if get_accelerator().device_name() != "cpu":
        # torch's fused AdamW on GPUs: one kernel over all parameters instead of a kernel per tensor
        # (foreach); DeepSpeed passes it through to torch.optim.AdamW.
        config["optimizer"]["params"]["fused"] = True
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    if t.zero_stage == 3:
        # Gather whole weights on rank 0 when saving, so an exported checkpoint needs no ZeRO tools.
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return config
