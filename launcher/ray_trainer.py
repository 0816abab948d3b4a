"""Ray Train's TorchTrainer as zeroray runs it: without the Ray Data machinery it would start for nothing."""

from __future__ import annotations

from ray.train.torch import TorchTrainer

try:  # Ray Train V2's own callback (a private module); should it move, runs keep Ray's default
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
except ImportError:  # pragma: no cover - another Ray
    DatasetsCallback = None


class ZerorayTrainer(TorchTrainer):
    """A TorchTrainer that starts no DatasetManager actor when it is given no Ray Datasets.

    zeroray's workers read their own streaming `datasets` pipeline, never Ray Data, yet Ray Train V2 (2.60)
    creates a DatasetManager actor, a Python process of its own importing Ray Data, at every start of the
    worker group, and ships Ray Data's context to each worker. On a small machine that process competes with
    the workers' start (docs/performance.md has the figures). The callback is dropped only when no dataset
    is passed, so a caller who does pass Ray Datasets gets Ray's behaviour unchanged."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if DatasetsCallback is None or self.datasets:
            return callbacks
        return [cb for cb in callbacks if not isinstance(cb, DatasetsCallback)]
