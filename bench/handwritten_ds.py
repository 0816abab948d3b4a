"""The overhead baseline: the smallest DeepSpeed training loop one would write by hand.

The run spec's model, batch, threads and the very DeepSpeed config zeroray derives from it (so the
two differ only in what zeroray adds: Ray, the data pipeline, metrics, checkpoints), fed with random
tokens already in memory. Run under torchrun; rank 0 prints one JSON line.

    torchrun --standalone --nproc_per_node 2 bench/handwritten_ds.py CONFIG STEPS WARMUP [key=value ...]
"""

import json
import sys
import time

import deepspeed
import torch
import torch.distributed as dist

import models
from trainer.ds_config import deepspeed_config, resolve_precision
from trainer.spec import load_spec


def main(config: str, steps: int, warmup: int, overrides: list[str]) -> None:
    schedule = [f"trainer.max_steps={steps}", f"trainer.warmup_steps={min(warmup, steps - 1)}"]
    spec = load_spec(config, [*overrides, *schedule])
    t = spec.trainer
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(spec.cluster.cpus_per_worker)
    torch.manual_seed(0)
    model = models.build(spec.model)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.param_groups(t.weight_decay),
                                      config=deepspeed_config(spec, resolve_precision(spec)))
    vocab, seq = spec.model.vocab_size, spec.data.seq_len
    batches = [torch.randint(0, vocab, (t.micro_batch_size, seq + 1)) for _ in range(8)]
    for step in range(steps):
        if step == warmup:
            dist.barrier()
            t0 = time.perf_counter()
        for micro in range(t.grad_accum_steps):
            rows = batches[(step * t.grad_accum_steps + micro) % len(batches)]
            loss = engine(input_ids=rows[:, :-1], labels=rows[:, 1:]).loss
            engine.backward(loss)
            engine.step()
    dist.barrier()
    seconds = time.perf_counter() - t0
    tokens = (steps - warmup) * spec.tokens_per_step
    if dist.get_rank() == 0:
        print(json.dumps({"tokens_per_s": tokens / seconds, "steps": steps - warmup, "seconds": seconds}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
