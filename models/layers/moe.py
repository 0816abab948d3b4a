"""Mixture-of-experts feed-forward layer: token-choice top-k routing with SwiGLU experts.

Routing math runs in fp32 (router logits, softmax, losses) whatever the activation dtype.
Dispatch is sort-and-group: assignments are sorted by expert, each expert runs one matmul on
its contiguous slice, and results are scattered back with index_add — no Python loop over
tokens. The experts' weights are three stacked tensors [E, …], so every expert's parameters
take part in every step (ZeRO-3 gathers them as a whole; no leaf-module trick needed).

Losses (both already multiplied by their coefficients):
- load balance (Switch Transformer): α · E · Σᵢ fᵢ · Pᵢ, fᵢ the share of routed assignments that
  chose expert i (before capacity drops), Pᵢ the mean router probability of expert i;
- router z-loss (ST-MoE): β · mean(logsumexp(logits)²).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn


def _grouped_mm_works(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether torch._grouped_mm runs here (torch ≥ 2.8 on CPU and Hopper; other GPUs and dtypes may refuse)."""
    key = (dtype, device.type)
    if key not in _GROUPED_MM:
        try:
            a = torch.ones(2, 16, dtype=dtype, device=device)
            b = torch.ones(2, 16, 16, dtype=dtype, device=device)
            torch._grouped_mm(a, b, offs=torch.tensor([1, 2], dtype=torch.int32, device=device))
            _GROUPED_MM[key] = True
        except (AttributeError, RuntimeError, NotImplementedError, TypeError, ValueError):
            _GROUPED_MM[key] = False
    return _GROUPED_MM[key]


_GROUPED_MM: dict[tuple[torch.dtype, str], bool] = {}


def experts_swiglu(rows: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                   w_down: torch.Tensor) -> torch.Tensor:
    """Each expert's SwiGLU on its rows: `rows` sorted by expert, `counts` [E] rows per expert, weights
    [E, d, h] / [E, h, d]. One grouped matmul per weight (torch._grouped_mm) where the device has it:
    no host sync for the split sizes, no Python loop over experts; else the reference loop
    (`experts_swiglu_reference`, also the tests' oracle)."""
    if not _grouped_mm_works(rows.dtype, rows.device) or w_gate.dtype != rows.dtype:
        return experts_swiglu_reference(rows, counts, w_gate, w_up, w_down)
    offs = counts.cumsum(0).to(torch.int32)
    gate = torch._grouped_mm(rows, w_gate, offs=offs)
    up = torch._grouped_mm(rows, w_up, offs=offs)
    return torch._grouped_mm(F.silu(gate) * up, w_down, offs=offs)


def experts_swiglu_reference(rows: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                             w_down: torch.Tensor) -> torch.Tensor:
    """The plain formulation: split by expert (the split sizes need them on the host: one sync)."""
    sizes = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
    outputs = [(F.silu(chunk @ w_gate[i]) * (chunk @ w_up[i])) @ w_down[i] for i, chunk in enumerate(rows.split(sizes))]
    return torch.cat(outputs)


class MoEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_experts: int = Field(8, ge=1, description="Experts per MoE layer.")
    top_k: int = Field(2, ge=1, description="Experts each token is sent to.")
    expert_hidden: int = Field(0, ge=0, description="Hidden size of each expert; 0 = the dense MLP's size ÷ top_k.")
    capacity_factor: float = Field(
        0.0, ge=0, description="Expert capacity = factor × tokens × top_k ÷ experts; extra tokens are dropped. 0 = dropless."
    )
    aux_loss_coef: float = Field(0.01, ge=0, description="α of the load-balancing loss.")
    z_loss_coef: float = Field(1e-3, ge=0, description="β of the router z-loss.")

    @model_validator(mode="after")
    def _k_fits(self) -> MoEConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts})")
        return self


class Router(nn.Linear):
    """Router logits in fp32 whatever the weights' dtype (bf16 logits would blur the top-k).

    A module with its own forward rather than `F.linear(x, router.weight)` in the MoE layer: under
    ZeRO-3 a parameter should be used inside its own module's forward, where DeepSpeed gathers it.
    Still an `nn.Linear`, so initialisation and FLOP counts treat it as one."""

    def __init__(self, d_model: int, num_experts: int):
        super().__init__(d_model, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class MoELayer(nn.Module):
    def __init__(self, d_model: int, hidden: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        e = cfg.num_experts
        self.router = Router(d_model, e)
        self.w_gate = nn.Parameter(torch.empty(e, d_model, hidden))
        self.w_up = nn.Parameter(torch.empty(e, d_model, hidden))
        self.w_down = nn.Parameter(torch.empty(e, hidden, d_model))
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, std=0.02)
        # One record per call since the last `reset()`: a layer shared by several depths (WideNet)
        # is called many times per forward, and every use adds its own losses and load.
        self.calls: list[RoutingRecord] = []

    def reset(self) -> None:
        self.calls = []

    def parameters_per_expert(self) -> int:
        return (self.w_gate.numel() + self.w_up.numel() + self.w_down.numel()) // self.cfg.num_experts

    def inactive_parameters(self) -> int:
        """Expert parameters a token does not pass through: all but top_k experts."""
        return (self.cfg.num_experts - self.cfg.top_k) * self.parameters_per_expert()

    def expert_macs_per_token(self) -> int:
        """Multiply-adds of the top_k experts a token passes through (each expert: 3 matrices)."""
        return self.cfg.top_k * self.parameters_per_expert()

    def capacity(self, num_tokens: int) -> int:
        if self.cfg.capacity_factor == 0:
            return num_tokens * self.cfg.top_k  # dropless: room for every assignment
        return max(1, math.ceil(self.cfg.capacity_factor * num_tokens * self.cfg.top_k / self.cfg.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        t, e, k = tokens.shape[0], self.cfg.num_experts, self.cfg.top_k
        logits = self.router(tokens)  # [T, E] in fp32
        probs = logits.softmax(dim=-1)
        gate, expert = probs.topk(k, dim=-1)  # [T, k]

        # First choices claim capacity before second choices (GShard): order assignments k-major.
        flat_expert = expert.t().reshape(-1)  # [k·T]
        flat_token = torch.arange(t, device=x.device).repeat(k)
        flat_gate = gate.t().reshape(-1)
        one_hot = F.one_hot(flat_expert, e)
        position = (one_hot.cumsum(0) - 1).gather(1, flat_expert[:, None]).squeeze(1)
        keep = position < self.capacity(t)

        kept_expert, kept_token, kept_gate = flat_expert[keep], flat_token[keep], flat_gate[keep]
        order = kept_expert.argsort(stable=True)
        counts = torch.bincount(kept_expert, minlength=e)
        routed = tokens[kept_token[order]]
        expert_out = self.run_experts(routed, counts) * kept_gate[order, None].to(x.dtype)
        y = torch.zeros_like(tokens).index_add_(0, kept_token[order], expert_out)

        share = one_hot.float().mean(0)  # fᵢ over all k·T assignments, before drops
        self.calls.append(RoutingRecord(
            aux_losses={
                "load_balance": self.cfg.aux_loss_coef * e * (share * probs.mean(0)).sum(),
                "router_z": self.cfg.z_loss_coef * torch.logsumexp(logits, dim=-1).pow(2).mean(),
            },
            tokens_per_expert=counts.detach(),
            dropped_fraction=1.0 - keep.float().mean().detach(),
        ))
        return y.reshape(shape)

    def run_experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Each expert's SwiGLU on its rows: `rows` are sorted by expert, `counts` [E] says how many
        each has; the outputs come back in the same order. The one step expert parallelism replaces
        (models/layers/expert_parallel.py), so routing, capacity and losses stay in one place."""
        return experts_swiglu(rows, counts, self.w_gate, self.w_up, self.w_down)


@dataclass
class RoutingRecord:
    """What one call of an MoE layer leaves for the model: its losses and its expert load."""

    aux_losses: dict[str, torch.Tensor]
    tokens_per_expert: torch.Tensor
    dropped_fraction: torch.Tensor


def collect_routing(layers: list[MoELayer]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Aux losses summed over every call of every layer since their reset, and the step statistics
    (tokens per expert summed, dropped fraction averaged) under the names the trainer logs."""
    calls = [c for layer in layers for c in layer.calls]
    if not calls:
        return {}, {}
    aux = {k: torch.stack([c.aux_losses[k] for c in calls]).sum() for k in calls[0].aux_losses}
    stats = {
        "moe/tokens_per_expert": torch.stack([c.tokens_per_expert for c in calls]).sum(0).float(),
        "moe/dropped_fraction": torch.stack([c.dropped_fraction for c in calls]).mean(),
    }
    return aux, stats
