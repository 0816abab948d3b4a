"""Mixture-of-experts feed-forward layer: token-choice top-k routing with SwiGLU experts.

Routing math runs in fp32 (router logits, softmax, losses) whatever the activation dtype.
Dispatch is sort-and-group: assignments are sorted by expert, each expert runs one matmul on
its contiguous slice, and results are scattered back with index_add — no Python loop over
tokens. The experts' weights are three stacked tensors [E, …], so every expert's parameters
take part in every step (ZeRO-3 gathers them as a whole; no leaf-module trick needed).

Losses (both already multiplied by their coefficients):
- load balance (Switch Transformer): α · E · Σᵢ fᵢ · Pᵢ, fᵢ the share of routed assignments that
  chose expert i (before capacity drops), Pᵢ the mean router probability of expert i; over the whole
  micro-batch (`aux_loss_scope: batch`) or per sequence and averaged (`sequence`: DeepSeek-V3's
  complementary sequence-wise loss, eqs. 17-20 of arXiv 2412.19437);
- router z-loss (ST-MoE): β · mean(logsumexp(logits)²).

Balancing without the loss (`balance: bias` or `both`; DeepSeek-V3, arXiv 2408.15664): a per-expert
bias bᵢ is added to the router probabilities for the top-k *selection* only; the combine weights are
the unbiased probabilities of the selected experts, so bᵢ is not in the gradient. After each optimizer
step, bᵢ += rate · sign(mean load − loadᵢ), the loads counted over every micro-batch of the step and
every rank (`end_step`, one all-reduce for all layers): every rank holds the same bias. The bias is a
persistent buffer (in the checkpoints, fp32 whatever the weights' dtype).

Shared experts (DeepSeekMoE, arXiv 2401.06066): `shared_experts` always-active SwiGLU experts of the
routed experts' hidden size beside them, one SwiGLU of n × that size (the same function), added to
every token's output with weight 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from models.layers.mlp import SwiGLU


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


def _count(ids: torch.Tensor, n: int) -> torch.Tensor:
    """How many of `ids` equal each of 0..n-1 (int64). Not torch.bincount: on CUDA it reads the maximum
    back to the host to size its output, a sync per call."""
    return torch.zeros(n, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


class MoEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_experts: int = Field(8, ge=1, description="Experts per MoE layer.")
    top_k: int = Field(2, ge=1, description="Experts each token is sent to.")
    expert_hidden: int = Field(0, ge=0, description="Hidden size of each expert; 0 = the dense MLP's size ÷ top_k.")
    capacity_factor: float = Field(
        0.0, ge=0, description="Expert capacity = factor × tokens × top_k ÷ experts; extra tokens are dropped. 0 = dropless."
    )
    balance: Literal["aux_loss", "bias", "both"] = Field(
        "aux_loss", description="How the load is balanced: `aux_loss` the load-balancing loss; `bias` "
        "DeepSeek-V3's aux-loss-free expert bias (selection only, updated after each step by the sign of "
        "the load error); `both` the bias plus the loss (e.g. a small sequence-level one).")
    bias_update_rate: float = Field(
        1e-3, gt=0, description="γ of the expert-bias update b += γ·sign(mean load − load) after each "
        "optimizer step; used by `balance: bias` and `both` only.")
    aux_loss_coef: float = Field(0.01, ge=0, description="α of the load-balancing loss; used by `balance: "
                                 "aux_loss` and `both` only.")
    aux_loss_scope: Literal["batch", "sequence"] = Field(
        "batch", description="The load-balancing loss over the whole micro-batch (Switch) or per sequence, "
        "averaged (DeepSeek-V3's complementary sequence-wise loss).")
    z_loss_coef: float = Field(1e-3, ge=0, description="β of the router z-loss.")
    shared_experts: int = Field(
        0, ge=0, description="Always-active experts beside the routed ones (DeepSeekMoE), each a SwiGLU "
        "of the expert hidden size; their output is added to every token's.")

    @model_validator(mode="after")
    def _k_fits(self) -> MoEConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts})")
        # Value checks only: a resolved spec is parsed again from its dump, every field then "given".
        if self.balance == "both" and self.aux_loss_coef == 0:
            raise ValueError("balance: both adds the load-balancing loss to the expert bias, but aux_loss_coef "
                             "is 0; use balance: bias")
        return self

    @property
    def uses_bias(self) -> bool:
        return self.balance in ("bias", "both")

    @property
    def uses_aux_loss(self) -> bool:
        return self.balance in ("aux_loss", "both")


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
        self.shared = SwiGLU(d_model, cfg.shared_experts * hidden) if cfg.shared_experts else None
        self._init_balance()

    def _init_balance(self, bias: torch.Tensor | None = None) -> None:
        """The per-call records, the step's load counters and (with `balance: bias|both`) the expert
        bias; shared with the expert-parallel layer, which does not run `__init__`."""
        # One record per call since the last `reset()`: a layer shared by several depths (WideNet)
        # is called many times per forward, and every use adds its own losses and load.
        self.calls: list[RoutingRecord] = []
        e = self.cfg.num_experts
        if self.cfg.uses_bias:
            self.register_buffer("expert_bias", torch.zeros(e) if bias is None else bias.detach().clone().float())
        # [assigned before drops, kept] per expert, summed over the micro-batches of the current optimizer
        # step (int64: exact through an all-reduce, untouched by dtype casts); not in checkpoints, which
        # are written between steps, when it is zero.
        self.register_buffer("step_load", torch.zeros(2, e, dtype=torch.long), persistent=False)
        self.last_step_load: torch.Tensor | None = None  # the last finished step's, over all ranks

    def _apply(self, fn, recurse=True):
        """`.to(bf16)` and the like keep the expert bias fp32: γ = 1e-3 steps vanish in bf16 once |b| ~ 0.5."""
        bias = getattr(self, "expert_bias", None)
        out = super()._apply(fn, recurse)
        if bias is not None and self.expert_bias.dtype != torch.float32:
            self.expert_bias = bias.to(self.expert_bias.device)
        return out

    def reset(self) -> None:
        self.calls = []

    def parameters_per_expert(self) -> int:
        return (self.w_gate.numel() + self.w_up.numel() + self.w_down.numel()) // self.cfg.num_experts

    def inactive_parameters(self) -> int:
        """Expert parameters a token does not pass through: all but top_k experts."""
        return (self.cfg.num_experts - self.cfg.top_k) * self.parameters_per_expert()

    def expert_macs_per_token(self) -> int:
        """Multiply-adds of the top_k routed experts a token passes through (each expert: 3 matrices).
        The router and the shared experts are nn.Linear modules: counted with the model's Linears."""
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
        if self.cfg.uses_bias:  # the bias picks the experts; the weights stay the unbiased probabilities
            expert = (probs + self.expert_bias).topk(k, dim=-1).indices
            gate = probs.gather(1, expert)
        else:
            gate, expert = probs.topk(k, dim=-1)  # [T, k]

        # First choices claim capacity before second choices (GShard): order assignments k-major.
        flat_expert = expert.t().reshape(-1)  # [k·T]
        flat_token = torch.arange(t, device=x.device).repeat(k)
        flat_gate = gate.t().reshape(-1)
        assigned = _count(flat_expert, e)  # before drops
        if self.cfg.capacity_factor == 0:  # dropless: every assignment is kept, no positions needed
            kept_expert, kept_token, kept_gate, counts = flat_expert, flat_token, flat_gate, assigned
            dropped = torch.zeros((), device=x.device)
        else:
            one_hot = F.one_hot(flat_expert, e)
            position = (one_hot.cumsum(0) - 1).gather(1, flat_expert[:, None]).squeeze(1)
            keep = position < self.capacity(t)
            kept_expert, kept_token, kept_gate = flat_expert[keep], flat_token[keep], flat_gate[keep]
            counts = _count(kept_expert, e)
            dropped = 1.0 - keep.float().mean()
        order = kept_expert.argsort(stable=True)
        routed_token = kept_token[order]
        expert_out = self.run_experts(tokens[routed_token], counts) * kept_gate[order, None].to(x.dtype)
        y = torch.zeros_like(tokens).index_add_(0, routed_token, expert_out)
        if self.shared is not None:
            y = y + self.shared(tokens)

        aux_losses = {}
        if self.cfg.uses_aux_loss:
            aux_losses["load_balance"] = self.cfg.aux_loss_coef * self.balance_loss(probs, expert, assigned, shape)
        aux_losses["router_z"] = self.cfg.z_loss_coef * torch.logsumexp(logits, dim=-1).pow(2).mean()
        self.calls.append(RoutingRecord(
            aux_losses=aux_losses,
            tokens_per_expert=counts.detach(),
            dropped_fraction=dropped.detach(),
            assigned_per_expert=assigned.detach(),
        ))
        return y.reshape(shape)

    def balance_loss(self, probs: torch.Tensor, expert: torch.Tensor, assigned: torch.Tensor,
                     shape: torch.Size) -> torch.Tensor:
        """E · Σᵢ fᵢ · Pᵢ (unweighted), over the micro-batch or per sequence and averaged."""
        e, k = self.cfg.num_experts, self.cfg.top_k
        if self.cfg.aux_loss_scope == "batch" or len(shape) < 3:
            share = assigned.float() / expert.numel()  # fᵢ over all k·T assignments, before drops
            return e * (share * probs.mean(0)).sum()
        seqs = math.prod(shape[:-2])
        per_seq = probs.new_zeros(seqs, e).scatter_add_(
            1, expert.reshape(seqs, -1), probs.new_ones(()).expand(seqs, shape[-2] * k))
        share = per_seq / (shape[-2] * k)
        return e * (share * probs.reshape(seqs, shape[-2], e).mean(1)).sum(-1).mean()

    def run_experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Each expert's SwiGLU on its rows: `rows` are sorted by expert, `counts` [E] says how many
        each has; the outputs come back in the same order. The one step expert parallelism replaces
        (models/layers/expert_parallel.py), so routing, capacity and losses stay in one place."""
        return experts_swiglu(rows, counts, self.w_gate, self.w_up, self.w_down)


@dataclass
class RoutingRecord:
    """What one call of an MoE layer leaves for the model: its losses and its expert load."""

    aux_losses: dict[str, torch.Tensor]
    tokens_per_expert: torch.Tensor  # kept (after capacity drops)
    dropped_fraction: torch.Tensor
    assigned_per_expert: torch.Tensor  # chosen by the top-k, before drops


def collect_routing(layers: list[MoELayer]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Aux losses summed over every call of every layer since their reset, and the step statistics
    (tokens per expert summed, dropped fraction averaged) under the names the trainer logs.

    Called once per model forward, after it: a training forward (grad enabled, train mode) also adds
    its load to each layer's step counters here, not in the layer's forward, so a forward recomputed
    by activation checkpointing does not count twice, and evaluation does not count at all."""
    if torch.is_grad_enabled():
        for layer in layers:
            if layer.training and layer.calls:
                layer.step_load += torch.stack([torch.stack((c.assigned_per_expert, c.tokens_per_expert))
                                                for c in layer.calls]).sum(0)
    calls = [c for layer in layers for c in layer.calls]
    if not calls:
        return {}, {}
    aux = {k: torch.stack([c.aux_losses[k] for c in calls]).sum() for k in calls[0].aux_losses}
    stats = {
        "moe/tokens_per_expert": torch.stack([c.tokens_per_expert for c in calls]).sum(0).float(),
        "moe/dropped_fraction": torch.stack([c.dropped_fraction for c in calls]).mean(),
    }
    return aux, stats


def end_step(layers: list[MoELayer]) -> None:
    """After an optimizer step, on every rank (a collective when distributed): the step's load of every
    layer summed over ranks in one all-reduce; each layer keeps it for its statistics, updates its
    expert bias from it (b += γ·sign(mean − load)) and starts the next step's count. No host sync."""
    if not layers:
        return
    loads = torch.cat([layer.step_load.reshape(-1) for layer in layers])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(loads)
    for layer, load in zip(layers, loads.split([layer.step_load.numel() for layer in layers]), strict=True):
        load = load.view(2, -1)
        layer.last_step_load = load
        if layer.cfg.uses_bias:
            assigned = load[0].float()
            layer.expert_bias += layer.cfg.bias_update_rate * torch.sign(assigned.mean() - assigned)
        layer.step_load.zero_()


def load_statistics(layers: list[MoELayer]) -> dict[str, torch.Tensor]:
    """Per layer (its index among the model's MoE layers), from the last finished step's load over all
    micro-batches and ranks: max load ÷ mean load, dropped fraction, and mean |expert bias|; and the
    max ÷ mean averaged over layers. The same on every rank, and named so that the trainer's reduction
    averages them (names end in `_mean` or `fraction`). Empty before the first `end_step`."""
    out: dict[str, torch.Tensor] = {}
    ratios = []
    for i, layer in enumerate(layers):
        if layer.last_step_load is None:
            continue
        assigned, kept = layer.last_step_load.float()
        total = assigned.sum().clamp(min=1)
        ratio = assigned.max() / (total / assigned.numel())
        ratios.append(ratio)
        out[f"moe/layer_{i}/max_load_over_mean"] = ratio
        out[f"moe/layer_{i}/dropped_fraction"] = 1 - kept.sum() / total
        if layer.cfg.uses_bias:
            out[f"moe/layer_{i}/bias_abs_mean"] = layer.expert_bias.abs().mean()
    if ratios:
        out["moe/max_load_over_mean"] = torch.stack(ratios).mean()
    return out
