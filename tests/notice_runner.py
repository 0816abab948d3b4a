"""`torchrun … tests/notice_runner.py CONFIG [key=value …]`: the trainer as `python -m trainer` runs it, with a
drain notice source of its own instead of Ray's (the seam `trainer.loop.train(…, notices=…)`).

From its ZR_NOTICE_AT-th call on, the source says that the node of rank 1 goes ZR_NOTICE_DEADLINE_S seconds
after that first notice, and that no scheduler will restart the ranks (they train on at once). Like Ray's
`get_preemption_info` it is a barrier that gives every rank rank 0's answer."""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

from trainer.loop import train
from trainer.preemption import DrainNotice
from trainer.spec import load_spec

_calls, _deadline = 0, None


def notices() -> DrainNotice | None:
    global _calls, _deadline
    _calls += 1
    first = int(os.environ.get("ZR_NOTICE_AT", "0"))
    if not first or _calls < first:
        return None
    if _deadline is None:
        agreed = torch.tensor([time.time() + float(os.environ["ZR_NOTICE_DEADLINE_S"])], dtype=torch.float64)
        dist.broadcast(agreed, 0)  # rank 0's deadline on every rank
        _deadline = agreed.item()
    return DrainNotice(deadline=_deadline, nodes=("test-node",), ranks=(1,), hold_until=None)


if __name__ == "__main__":
    spec = load_spec(sys.argv[1], sys.argv[2:])
    if int(os.environ.get("RANK", "0")) == 0:
        from trainer.run_prep import prepare_run_dir

        prepare_run_dir(spec, fresh=False)
    train(spec, notices=notices)
