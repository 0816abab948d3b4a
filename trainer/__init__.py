"""The training loop that runs inside every worker (under Ray, torchrun or accelerate)."""

import importlib.abc
import sys


class _NoMlflowForDeepSpeedAutotuner(importlib.abc.MetaPathFinder):
    """DeepSpeed imports mlflow, when installed, for its autotuner (`deepspeed/autotuning/autotuner.py`,
    a `try: import mlflow`), on every `import deepspeed`: 1–2 s of start-up in the driver and in every
    worker, for a feature zeroray does not use. This finder fails that one import only; zeroray's own
    MLflow tracker (launcher/trackers.py) imports mlflow normally."""

    def find_spec(self, name, path=None, target=None):
        if name != "mlflow":
            return None
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_globals.get("__name__") == "deepspeed.autotuning.autotuner":
                raise ModuleNotFoundError("mlflow is not imported for DeepSpeed's autotuner", name=name)
            frame = frame.f_back
        return None


if not any(isinstance(f, _NoMlflowForDeepSpeedAutotuner) for f in sys.meta_path):
    sys.meta_path.insert(0, _NoMlflowForDeepSpeedAutotuner())
