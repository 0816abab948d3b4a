"""Expert parallelism: each MoE layer's experts split over `ep_size` ranks, with real all-to-all
token exchange. Applied from outside, after the model is built (torchtitan style): the model
families never import this module, the trainer calls `shard_experts` before `deepspeed.initialize`.
It is the one module under models/ that knows about DeepSpeed.

The sharded layer keeps zeroray's routing unchanged (fp32 top-k, capacity with first choices first,
dropless, load-balance and z losses, expert bias, shared experts, statistics): it inherits `MoELayer.forward` and replaces only
`run_experts`, the step that applies the experts to the rows routed to them. Routing, capacity and
losses are computed on this rank's tokens, exactly as the unsharded layer does under data
parallelism, so `ep_size` changes where an expert runs, never which assignments are kept.

Why DeepSpeed's `AutoEPMoELayer` is a base class although none of its code runs: DeepSpeed 0.19.8
keys every MoE-specific behaviour of its engine on `isinstance(module, AutoEPMoELayer)` (or its own
`MoE`, which brings its own router and refuses ZeRO-3), and the config-driven AutoEP replaces the
router and drops our losses. Being an instance gives us, with our own forward:
  - runtime/engine.py:2101-2107   `has_moe_layers` (reads `num_experts`);
  - runtime/engine.py:2150-2153   `set_deepspeed_parallelism(...)` creates the EP / expert-data-
    parallel groups named `ep_size_N` (`ep_group_name`; `folding_group_handles` stays None);
  - runtime/engine.py:2329-2331   expert params (`allreduce=False`, `group_name`, moe/utils.py:27,
    :93-117) go to optimizer groups of their own, reduced over the expert-data-parallel group only
    (ZeRO-1/2: zero/stage_1_and_2.py:1641; ZeRO-0: engine.py:3841 `_get_gradients_for_reduction`)
    and broadcast within it (engine.py:2050-2056);
  - runtime/engine.py:2710-2714   ZeRO-3 accepts the layer (`_validate_zero3_moe_compatibility`,
    :2197) and partitions `ds_zero_placement_family="autoep_expert"` params over the expert-data-
    parallel group named by `ds_zero_partition_group_name` (`_resolve_zero3_param_placement`, :2242;
    zero/stage3.py:675); router params are `"replicated"`;
  - runtime/engine.py:5141-5238   `_save_moe_checkpoint` writes every expert (reads `ep_group_name`,
    `num_local_experts`, `num_experts`, `ep_size`, `expert_placement_descriptor`, the child
    `experts` with parameters named `w1`/`w2`/`w3` and their `DS_AUTOEP_UC_META` affine map),
    `_get_non_moe_state_dict` (:4984) leaves them out of the shared file, and `load_moe_state_dict`
    (:4133, :4219) puts them back; `deepspeed.checkpoint.ds_to_universal` consolidates them.
These are private internals: constraints.txt pins deepspeed==0.19.8 and tests/test_expert_parallel.py
fails if any of them stops holding (engine without MoE layers, experts not split, results unequal).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.checkpoint.autoep_affine import (
    autoep_placement_to_affine_map,
    legacy_uniform_autoep_placement_descriptor,
)
from deepspeed.checkpoint.constants import (
    AFFINE_MAP,
    AUTOEP_EXPERT_PLACEMENT,
    AUTOEP_PARAM_EP_RANK,
    AUTOEP_PARAM_LOCAL_EXPERTS,
    AUTOEP_PARAM_LOGICAL_SHAPE,
    DS_AUTOEP_UC_META,
)
from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
from deepspeed.utils import groups
from torch import nn

from models.layers.moe import MoELayer, experts_swiglu

# DeepSpeed's checkpoint code hard-codes these names (engine.py:5154); ours are w_gate/w_up/w_down.
EXPERT_NAMES = {"w1": "w_gate", "w3": "w_up", "w2": "w_down"}


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` with uneven splits whose backward is the reverse exchange.

    torch.distributed.nn.functional.all_to_all_single does the same but is deprecated (torch 2.13
    warns and points at private functional collectives), hence these few lines."""

    @staticmethod
    def forward(ctx, x, output_splits: list[int], input_splits: list[int], group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        back = grad.new_empty((sum(input_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), input_splits, output_splits, group=ctx.group)
        return back, None, None, None


class LocalExperts(nn.Module):
    """This rank's experts, stacked [E_local, …] in zeroray's layout under DeepSpeed's names:
    w1 = gate, w3 = up, w2 = down."""

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor):
        super().__init__()
        self.w1 = nn.Parameter(w_gate.detach().clone())  # [E_local, d, h]
        self.w3 = nn.Parameter(w_up.detach().clone())  # [E_local, d, h]
        self.w2 = nn.Parameter(w_down.detach().clone())  # [E_local, h, d]

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return experts_swiglu(rows, counts, self.w1, self.w3, self.w2)


class ExpertParallelMoE(MoELayer, AutoEPMoELayer):
    """An MoELayer holding experts [ep_rank·E/ep, (ep_rank+1)·E/ep) of its group of `ep_size` ranks;
    routed rows travel to the rank holding their expert and come back (see the module docstring for
    why AutoEPMoELayer is a base class)."""

    def __init__(self, dense: MoELayer, ep_size: int, ep_rank: int):
        nn.Module.__init__(self)  # neither MoELayer's (all experts) nor AutoEPMoELayer's (its router)
        e = dense.cfg.num_experts
        if e % ep_size:
            raise ValueError(f"num_experts ({e}) must be divisible by the expert-parallel size ({ep_size})")
        if not 0 <= ep_rank < ep_size:
            raise ValueError(f"ep_rank {ep_rank} is outside 0..{ep_size - 1}")
        self.cfg = dense.cfg
        # Records, step load counters and the expert bias (a copy of the built layer's): the bias is
        # replicated, updated from loads all-reduced over every rank, so it stays equal everywhere.
        self._init_balance(getattr(dense, "expert_bias", None))
        self.shared = dense.shared  # shared experts: replicated, data-parallel like the router
        # The attributes DeepSpeed's engine reads from an AutoEPMoELayer.
        self.num_experts, self.ep_size, self.ep_rank = e, ep_size, ep_rank
        self.num_local_experts = e // ep_size
        self.ep_group_name = f"ep_size_{ep_size}"
        self.ep_group = None  # set by set_deepspeed_parallelism, which deepspeed.initialize calls
        self.folding_group_handles = None
        self.expert_placement_descriptor = legacy_uniform_autoep_placement_descriptor(
            e, self.num_local_experts, ep_size
        )
        mine = self.expert_range
        self.router = dense.router
        self.experts = LocalExperts(dense.w_gate[mine], dense.w_up[mine], dense.w_down[mine])
        for p in self.experts.parameters():
            p.allreduce = False  # ZeRO-0/1/2: an expert parameter, reduced over its group only
            p.group_name = self.ep_group_name
            p.ds_zero_placement_family = "autoep_expert"  # ZeRO-3: partitioned over that group
            p.ds_zero_partition_group_name = self.ep_group_name
            logical = [e, *p.shape[1:]]  # checkpoints record where this slice sits in [E, …]
            setattr(p, DS_AUTOEP_UC_META, {
                AUTOEP_EXPERT_PLACEMENT: self.expert_placement_descriptor,
                AFFINE_MAP: autoep_placement_to_affine_map(self.expert_placement_descriptor, logical).to_dict(),
                AUTOEP_PARAM_LOGICAL_SHAPE: logical,
                AUTOEP_PARAM_EP_RANK: ep_rank,
                AUTOEP_PARAM_LOCAL_EXPERTS: list(range(mine.start, mine.stop)),
            })
        for p in self.router.parameters():
            p.allreduce = True
            p.ds_zero_placement_family = "replicated"

    @property
    def expert_range(self) -> slice:
        """The global ids of the experts this rank holds."""
        return slice(self.ep_rank * self.num_local_experts, (self.ep_rank + 1) * self.num_local_experts)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False,
                                  folding_group_handles=None) -> None:
        """Called by deepspeed.initialize: create (once) DeepSpeed's EP and expert-data-parallel
        groups, and check that this layer was built for the rank DeepSpeed puts it at."""
        if folding_group_handles is not None:
            raise ValueError("expert tensor parallelism (AutoEP + AutoTP folding) is not supported")
        if self.ep_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(
                expert_parallel_size_=self.ep_size, mp_size=1, pp_size=1, mp_mode="sp",
                use_data_before_expert_parallel_=use_data_before_expert_parallel_,
            )
        self.ep_group = groups._get_expert_parallel_group(self.ep_group_name)
        actual = dist.get_rank(group=self.ep_group)
        if actual != self.ep_rank:
            raise RuntimeError(
                f"this MoE layer holds the experts of expert-parallel rank {self.ep_rank}, but DeepSpeed "
                f"placed global rank {dist.get_rank()} at expert-parallel rank {actual} of its group "
                f"{dist.get_process_group_ranks(self.ep_group)}"
            )

    def run_experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """`rows` sorted by global expert, `counts` [E]. Experts of one rank are contiguous, so the
        rows for rank r are one slice: send them, run the local experts on what arrives, send back."""
        if self.ep_group is None:
            raise RuntimeError("expert-parallel layer used before deepspeed.initialize set up its groups")
        ep, el = self.ep_size, self.num_local_experts
        recv_counts = torch.empty_like(counts)  # [source rank][local expert]
        dist.all_to_all_single(recv_counts, counts, group=self.ep_group)
        # all_to_all takes its split sizes as Python ints: the one host sync of an expert-parallel layer.
        send_split, recv_split = torch.stack(
            (counts.view(ep, el).sum(1), recv_counts.view(ep, el).sum(1))
        ).tolist()
        received = _AllToAll.apply(rows, recv_split, send_split, self.ep_group)
        # Received rows are grouped by source rank, then local expert: regroup them by expert.
        local_expert = torch.arange(el, device=rows.device).repeat(ep).repeat_interleave(recv_counts)
        by_expert = local_expert.argsort(stable=True)
        out = self.experts(received[by_expert], recv_counts.view(ep, el).sum(0))
        out = torch.empty_like(out).index_copy_(0, by_expert, out)  # back to [source rank][expert]
        return _AllToAll.apply(out, send_split, recv_split, self.ep_group)


def shard_experts(model: nn.Module, ep_size: int, ep_rank: int) -> int:
    """Swap every MoELayer of a built model, in place, for an ExpertParallelMoE holding this rank's
    experts; returns how many were swapped. The weights are copied from the built layers, so a model
    built with the same seed starts from the same weights as without expert parallelism (at the
    price of materialising every expert once on each rank before the slice is kept)."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is MoELayer:
                setattr(module, name, ExpertParallelMoE(child, ep_size, ep_rank))
                swapped += 1
    return swapped


def check_engine(engine, ep_size: int) -> None:
    """After deepspeed.initialize: DeepSpeed treats the layers as expert-parallel (otherwise it would
    average each rank's different experts together), with the groups the layers were built for."""
    layers = [m for m in engine.module.modules() if isinstance(m, ExpertParallelMoE)]
    if not layers or not engine.has_moe_layers:
        raise RuntimeError(
            f"expert parallelism ({ep_size} ranks): DeepSpeed did not recognise the {len(layers)} "
            f"expert-parallel MoE layer(s) (has_moe_layers={engine.has_moe_layers}); this needs the "
            f"deepspeed version pinned in constraints.txt"
        )
    rank = dist.get_rank()
    expected = list(range(rank - rank % ep_size, rank - rank % ep_size + ep_size))
    for layer in layers:
        if layer.ep_group is None or dist.get_process_group_ranks(layer.ep_group) != expected:
            got = None if layer.ep_group is None else dist.get_process_group_ranks(layer.ep_group)
            raise RuntimeError(f"expert-parallel group of rank {rank} is {got}, expected {expected}")
