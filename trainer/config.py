"""The `trainer` section of the run spec: optimisation, precision, ZeRO, checkpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage: 0 (plain data parallel) to 3.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto = bf16 where the hardware supports it, else fp32."
    )
    micro_batch_size: int = Field(8, ge=1, description="Sequences per rank per forward pass.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated into one optimizer step.")
    global_batch_size: int | None = Field(
        None, ge=1, description="Optional check: must equal micro_batch_size × grad_accum_steps × workers."
    )
    expert_parallel: int = Field(
        1, ge=1, description="Ranks that split each MoE layer's experts; 1 = every rank holds all experts."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each layer's activations in the backward pass (less memory, ~1/3 more compute)."
    )
    max_steps: int = Field(300, ge=1, description="Optimizer steps to train for.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak.")
    warmup_steps: int = Field(30, ge=0, description="Linear warm-up steps before the cosine decay.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices only).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 = off.")
    seed: int = Field(0, description="Seed of model initialisation and every random draw.")
    log_every: int = Field(10, ge=1, description="Steps between metric records.")
    checkpoint_every: int = Field(100, ge=0, description="Steps between checkpoints; 0 = only at the end.")
    max_failures: int = Field(0, ge=0, description="Restarts from the latest checkpoint Ray may attempt.")

    @model_validator(mode="after")
    def _schedule_fits(self) -> TrainerConfig:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be smaller than max_steps ({self.max_steps})"
            )
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas {self.betas} must each lie in [0, 1)")
        return self
