"""Ray Train's TorchTrainer as zeroray runs it: without the helper actors that would do nothing for it."""

from __future__ import annotations

from ray.train.torch import TorchTrainer

try:  # Ray Train V2's own callbacks (private modules); should they move, runs keep Ray's defaults
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
except ImportError:  # pragma: no cover - another Ray
    DatasetsCallback = PlacementGroupCleanerCallback = None


def cluster_has_dashboard() -> bool:
    """Whether the Ray cluster this process joined runs the dashboard (and with it the State API)."""
    import ray

    try:
        return bool(ray._private.worker.get_dashboard_url())
    except Exception:  # another Ray: assume it does, keeping Ray's behaviour
        return True


class ZerorayTrainer(TorchTrainer):
    """A TorchTrainer that leaves out two of Ray Train V2's (2.60) helper actors where they cannot help.
    Each is a Python process of its own, started at every start of the worker group and competing with the
    workers' start on a small machine (docs/performance.md has the figures).

    - DatasetManager, when no Ray Dataset is given: zeroray's workers read their own streaming `datasets`
      pipeline, never Ray Data, yet Ray Train creates the actor (importing Ray Data) and ships Ray Data's
      context to every worker regardless.
    - PlacementGroupCleaner, on a cluster without the dashboard (zeroray's embedded one): it asks the State
      API every second whether the controller lives, which needs the dashboard; without it every query
      fails ("State API may be temporarily unavailable"), so it never cleans anything up, and stopping it
      holds the end of every run for up to a second.

    A caller who passes Ray Datasets, or runs on a cluster with the dashboard, gets Ray's behaviour."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        unused: list[type] = []
        if DatasetsCallback is not None and not self.datasets:
            unused.append(DatasetsCallback)
        if PlacementGroupCleanerCallback is not None and not cluster_has_dashboard():
            unused.append(PlacementGroupCleanerCallback)
        return [cb for cb in callbacks if not isinstance(cb, tuple(unused))]
