"""Model-state memory per rank under each ZeRO stage: DeepSpeed's tensors against the ZeRO paper.

The paper (Rajbhandari et al. 2020, §5) counts, for Ψ parameters trained with mixed-precision Adam
on N data-parallel ranks, 2Ψ bytes of 16-bit weights, 2Ψ of 16-bit gradients and 12Ψ of optimizer
state (fp32 master weights, momentum, variance) per rank; stage 1 partitions the optimizer state,
stage 2 also the gradients, stage 3 also the weights. `paper_bytes` is that formula.

`main` measures it: under torchrun, for each stage in turn, it builds the run spec's model, wraps it
with the DeepSpeed config zeroray derives from the spec, trains one step on random tokens (so Adam's
state exists), runs the forward and backward of a second one (so gradients exist, as they do at
their peak) and sums the bytes of every tensor storage each rank holds, each counted once:

- params: the model's weights (ZeRO-3: the rank's partition, plus parameters below DeepSpeed's
  persistence threshold, which every rank keeps whole);
- optimizer: the basic optimizer's parameters (fp32 master weights) and state;
- grads: `.grad` of those tensors and the optimizer wrapper's gradient tensors (attribute names
  with "grad");
- buffers: every other tensor the ZeRO optimizer holds (communication buckets and the like).

It also resets the process's peak RSS before each stage and reads it after the step. Rank 0
prints one JSON line.

    torchrun --standalone --nproc_per_node 2 bench/zero_memory.py CONFIG STAGES [key=value ...]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

CATEGORIES = ("params", "grads", "optimizer")


def paper_bytes(params: int, stage: int, ranks: int) -> dict[str, float]:
    """Bytes of model states per rank in the ZeRO paper: 16Ψ, 4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N, 16Ψ/N for stages
    0–3 (mixed-precision Adam, K = 12), by category."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, not {stage!r}")
    if ranks < 1 or params < 0:
        raise ValueError(f"need params ≥ 0 and ranks ≥ 1 (got params={params}, ranks={ranks})")
    out = {
        "params": 2 * params / (ranks if stage >= 3 else 1),
        "grads": 2 * params / (ranks if stage >= 2 else 1),
        "optimizer": 12 * params / (ranks if stage >= 1 else 1),
    }
    out["total"] = sum(out.values())
    return out


def _tensors_under(obj, path: str, depth: int):
    """(attribute path, tensor) for tensors inside containers, not inside other objects: the
    optimizer wrapper also references the model and the process groups."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif depth > 0 and isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_under(value, path, depth - 1)
    elif depth > 0 and isinstance(obj, list | tuple):
        for value in obj:
            yield from _tensors_under(value, path, depth - 1)


def _union_bytes(extents: set[tuple[int, int]]) -> int:
    """Bytes covered by (start, length) extents, overlaps once."""
    covered, end = 0, 0
    for start, length in sorted(extents):
        covered += max(0, start + length - max(start, end))
        end = max(end, start + length)
    return covered


def held_bytes(engine) -> dict:
    """Bytes of the tensor storages this rank holds for the engine, by category (each storage once;
    the first category that claims it wins, in the order params, optimizer, grads, buffers), with
    the optimizer wrapper's attributes behind them. `tensor_bytes` counts numel × element_size of the
    tensors found instead: less where a view keeps a larger storage alive."""
    storages: dict[int, dict] = {}

    def claim(tensor, category: str, attribute: str) -> None:
        storage = tensor.untyped_storage()
        if tensor.device.type == "meta" or storage.nbytes() == 0:
            return  # meta tensors (shapes only) hold no memory
        held = storages.setdefault(storage.data_ptr(), {"category": category, "attribute": attribute,
                                                        "nbytes": storage.nbytes(), "views": set()})
        size = tensor.element_size()
        held["views"].add((tensor.storage_offset() * size, tensor.numel() * size))

    params, kept_whole = [], {}
    for name, p in engine.module.named_parameters():
        params.append(p)
        if getattr(p, "ds_tensor", None) is not None:
            claim(p.ds_tensor, "params", "ZeRO-3 partitions")
            if p.data.numel():
                kept_whole[name] = p.data.numel()
                claim(p.data, "params", "whole weights kept by ZeRO-3")
        else:
            claim(p.data, "params", "weights")
    basic = getattr(engine, "basic_optimizer", None) or engine.optimizer
    wrapper = engine.optimizer
    found = [] if wrapper is basic else [
        (name.split("__")[-1], t)  # name-mangled private attributes by their own name
        for name, value in vars(wrapper).items() for _, t in _tensors_under(value, name, 4)
    ]
    # ZeRO-3 puts its fp32 partitions into the basic optimizer only for the step: find them by name too.
    master = [p for group in basic.param_groups for p in group["params"]]
    master += [t for name, t in found if "fp32" in name.lower() and "grad" not in name.lower()]
    for p in master:
        claim(p.data, "optimizer", "fp32 master weights")
    for state in basic.state.values():
        for value in state.values():
            if hasattr(value, "untyped_storage"):
                claim(value, "optimizer", "Adam state")
    for p in params + master:
        if p.grad is not None:
            claim(p.grad, "grads", ".grad")
    for name, tensor in found:
        if "grad" in name.lower():
            claim(tensor, "grads", name)
    for name, tensor in found:
        if tensor.grad is not None:
            claim(tensor.grad, "grads", f"{name}.grad")
        claim(tensor, "buffers", name)
    totals, tensor_totals, by_attribute = defaultdict(int), defaultdict(int), defaultdict(int)
    for held in storages.values():
        totals[held["category"]] += held["nbytes"]
        tensor_totals[held["category"]] += min(held["nbytes"], _union_bytes(held["views"]))
        by_attribute[f"{held['category']}: {held['attribute']}"] += held["nbytes"]
    return {"bytes": {c: totals[c] for c in (*CATEGORIES, "buffers")},
            "tensor_bytes": {c: tensor_totals[c] for c in (*CATEGORIES, "buffers")},
            "by_attribute": dict(sorted(by_attribute.items(), key=lambda kv: -kv[1])),
            "kept_whole": dict(sorted(kept_whole.items(), key=lambda kv: -kv[1]))}


def measure_stage(config: str, stage: int, overrides: list[str]) -> dict:
    import deepspeed
    import torch
    from peak_rss import peak_bytes, start_phase

    import models
    from trainer.ds_config import deepspeed_config, resolve_precision
    from trainer.spec import load_spec

    rss_before = start_phase()
    spec = load_spec(config, [*overrides, f"trainer.zero_stage={stage}"])
    torch.manual_seed(0)
    model = models.build(spec.model)
    n_params = sum(p.numel() for p in model.parameters())
    precision = resolve_precision(spec)
    engine, *_ = deepspeed.initialize(model=model,
                                      model_parameters=model.param_groups(spec.trainer.weight_decay),
                                      config=deepspeed_config(spec, precision))
    rows = torch.randint(0, spec.model.vocab_size, (spec.trainer.micro_batch_size, spec.data.seq_len + 1))
    batch = {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}
    engine.backward(engine(**batch).loss)
    engine.step()  # Adam's state exists from here on
    engine.backward(engine(**batch).loss)  # gradients held, as between backward and step
    held = held_bytes(engine)
    engine.step()
    result = {"stage": stage, "params": n_params, "precision": precision,
              "optimizer_class": type(engine.optimizer).__name__, **held,
              "rss_before_bytes": rss_before, "peak_rss_bytes": peak_bytes()}
    del engine, model
    return result


def main(argv: list[str]) -> None:
    # DeepSpeed's autotuner imports mlflow when it is installed (seconds per rank); nothing here uses it.
    sys.modules.setdefault("mlflow", None)
    import deepspeed
    import torch
    import torch.distributed as dist

    config, stages, overrides = argv[0], [int(s) for s in argv[1].split(",")], argv[2:]
    deepspeed.init_distributed(dist_backend="gloo")
    from trainer.spec import load_spec

    torch.set_num_threads(load_spec(config, overrides).cluster.cpus_per_worker)
    per_stage = []
    for stage in stages:
        mine = measure_stage(config, stage, overrides)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        per_stage.append({"stage": stage, "ranks": everyone})
    if dist.get_rank() == 0:
        print(json.dumps({"world": dist.get_world_size(), "stages": per_stage}), flush=True)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
