"""Each rank's random-number generators, saved in its checkpoint state and restored on resume.

A module of its own, apart from the checkpoint store: the store is also read by the driver (`zeroray train`
lists checkpoints before any worker starts, `zeroray runs` lists runs), which has no use for DeepSpeed's
accelerator and should not pay its import.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from deepspeed.accelerator import get_accelerator


def rng_state() -> dict:
    accel = get_accelerator()
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "accelerator": None if accel.device_name() == "cpu" else accel.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["accelerator"] is not None:
        get_accelerator().set_rng_state(state["accelerator"])
