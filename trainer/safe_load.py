"""Loading checkpoint files without running code from them.

A run directory on shared object storage is writable by many people and jobs; a pickle that anyone
could replace would run its code on every training node at the next resume, and on the laptop of
whoever exports. So every checkpoint file zeroray or DeepSpeed reads goes through torch's weights-only
unpickler, which builds tensors, containers, numbers and strings, plus the few classes named in
`SAFE_GLOBALS` (rebuilt from their saved attributes; no `__reduce__` callable runs).

Why a patch of `torch.load` while DeepSpeed loads: DeepSpeed 0.19.8 passes `weights_only=False`
explicitly in its checkpoint engine, zero_to_fp32 and ds_to_universal. `weights_only_loads()` makes
every `torch.load` call inside it a weights-only one. The SHA-256 manifest does not protect against a
writer of the bucket (it sits in the same bucket); this does.
"""

from __future__ import annotations

import pickle
import runpy
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


def _safe_globals() -> list:
    """What DeepSpeed's and zeroray's own checkpoint files hold besides tensors (found with
    torch.serialization.get_unsafe_globals_in_checkpoint on checkpoints of every ZeRO stage)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [
        LossScaler, ZeroStageEnum, fragment_address,  # ZeRO optimizer states
        np.ndarray, np.dtype, np._core.multiarray._reconstruct,  # the numpy RNG state in a rank state
        *{type(np.dtype(t)) for t in ("uint32", "int64", "float64", "float32", "int32", "uint8", "bool")},
    ]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file holds objects a weights-only load refuses."""


def _refusal(path, exc: Exception) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path} holds objects zeroray does not load (a weights-only load refused it: {str(exc).splitlines()[0]}). "
        f"zeroray and DeepSpeed never write such objects: the file was altered or is not a checkpoint file. "
        f"Replace it from a copy you trust, or resume from an earlier checkpoint."
    )


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside runs weights-only, whatever its caller asked for."""
    torch.serialization.add_safe_globals(_safe_globals())
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            raise _refusal(f, exc) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def load_file(path: Path, map_location="cpu"):
    """torch.load of one checkpoint file, weights-only."""
    with weights_only_loads():
        return torch.load(path, map_location=map_location)


def run_module_weights_only(module: str) -> None:
    """`python -m trainer.safe_load MODULE ARGS…`: run a DeepSpeed tool (ds_to_universal) with every
    torch.load weights-only, in the subprocess where it runs (and the worker processes it forks)."""
    sys.argv = [module, *sys.argv[2:]]
    with weights_only_loads():
        runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    run_module_weights_only(sys.argv[1])
