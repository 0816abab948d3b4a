"""The baseline for `bench/overhead.py`: the smallest DeepSpeed training loop one would write by hand.

Same model and DeepSpeed settings as a zeroray run spec, random tokens already in memory (no data
pipeline, no metrics, no checkpoints). Run under torchrun; rank 0 prints one JSON line.

    torchrun --standalone --nproc_per_node 2 bench/handwritten_ds.py CONFIG STAGE STEPS WARMUP
"""

import json
import sys
import time

import deepspeed
import torch
import torch.distributed as dist

import models
from launcher.spec import load_spec


def main(config: str, stage: int, steps: int, warmup: int) -> None:
    spec = load_spec(config, [f"trainer.zero_stage={stage}"])
    t = spec.trainer
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(spec.cluster.cpus_per_worker)
    torch.manual_seed(0)
    model = models.build(spec.model)
    ds_config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "weight_decay": 0.1, "torch_adam": True}},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    vocab, seq = spec.model.vocab_size, spec.data.seq_len
    batches = [torch.randint(0, vocab, (t.micro_batch_size, seq + 1)) for _ in range(8)]
    for step in range(steps):
        if step == warmup:
            dist.barrier()
            t0 = time.perf_counter()
        rows = batches[step % len(batches)]
        loss = engine(input_ids=rows[:, :-1], labels=rows[:, 1:]).loss
        engine.backward(loss)
        engine.step()
    dist.barrier()
    seconds = time.perf_counter() - t0
    tokens = (steps - warmup) * t.micro_batch_size * seq * dist.get_world_size()
    if dist.get_rank() == 0:
        print(json.dumps({"tokens_per_s": tokens / seconds, "steps": steps - warmup, "seconds": seconds}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
