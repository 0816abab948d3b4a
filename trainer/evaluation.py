"""Loss on held-out data (`eval:` in the run spec), measured the same way at every evaluation.

The batches are built once: the held-out sources go through the run's own tokenizer, packing and
objective (`data` with its sources replaced) as one logical stream, and rank r of W takes windows
r, r + W, r + 2W, … of it. So every evaluation scores the same windows, whatever the step, and the
set of windows does not depend on how they are dealt (W ranks together score the first
W × eval.batches × micro_batch_size windows). Every rank runs the same number of forward passes,
which ZeRO-3 needs: each forward gathers parameters from all ranks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from data_pipelines import BatchStream, DataConfig, LayoutError, SourceConfig, SourceError
from data_pipelines.objectives import IGNORE
from trainer.errors import ZerorayError

if TYPE_CHECKING:
    from trainer.spec import RunSpec



class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: tuple[SourceConfig, ...] = Field(
        (),
        description="Held-out data, in the shape of data.sources (e.g. the val/ folder `zeroray data prepare` "
        "writes); it goes through the run's tokenizer and objective. Empty = no evaluation.",
    )
    every: int = Field(0, ge=0, description="Steps between evaluations; 0 = only after the last step.")
    batches: int = Field(
        4, ge=1, description="Micro-batches (trainer.micro_batch_size rows) each rank evaluates; every evaluation "
        "reads the same first windows of the held-out data."
    )

    @model_validator(mode="after")
    def _has_data(self) -> EvalConfig:
        if self.every and not self.sources:
            raise ValueError(
                f"eval.every={self.every} but eval.sources is empty: add the held-out data, e.g. "
                f"eval.sources=[{{path: data/stdlib/val}}], or drop eval.every"
            )
        return self


def held_out_batches(spec: RunSpec, rank: int, world: int) -> list[dict[str, torch.Tensor]]:
    """This rank's eval micro-batches, on the CPU. Raises ZerorayError naming eval.sources when the
    held-out data cannot be read."""
    micro = spec.trainer.micro_batch_size
    where = ", ".join(s.path for s in spec.eval.sources)
    try:
        # The first windows in file order (no shuffle), read in this process: a few batches, once.
        cfg = DataConfig.model_validate({**spec.data.model_dump(), "sources": [s.model_dump() for s in spec.eval.sources],
                                         "streams": 1, "shuffle_buffer": 0, "loader_workers": 0})
        windows = BatchStream(cfg, micro_batch=1)  # one window per item, in the stream's order
        rows = [next(windows) for _ in range(world * spec.eval.batches * micro)][rank::world]
    except (SourceError, LayoutError, FileNotFoundError, ValidationError) as exc:
        raise ZerorayError(f"eval.sources: {exc}") from None
    except Exception as exc:  # pyarrow / datasets / fsspec errors on damaged or empty files
        raise ZerorayError(
            f"eval.sources: reading the held-out data from {where} failed with {type(exc).__name__}: {exc}. "
            f"Check the files (e.g. rebuild them with `zeroray data prepare`), or drop eval.sources"
        ) from None
    return [
        {k: torch.cat([r[k] for r in rows[i : i + micro]]) for k in rows[0]} for i in range(0, len(rows), micro)
    ]


class Evaluator:
    def __init__(self, spec: RunSpec, rank: int, world: int, device: torch.device):
        self.every = spec.eval.every
        # A few small tensors: kept on the device for the life of the run.
        self.batches = [{k: v.to(device) for k, v in b.items()} for b in held_out_batches(spec, rank, world)]

    def due(self, step: int, last: bool) -> bool:
        return last or bool(self.every and step % self.every == 0)

    def sums(self, engine) -> dict[str, torch.Tensor]:
        """This rank's token-weighted loss sum and token count (to be summed over ranks: `metrics`).

        Through the DeepSpeed engine, not the bare module: under ZeRO-3 the engine's hooks gather
        each layer's parameters for the forward pass."""
        device = self.batches[0]["input_ids"].device
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        tokens = torch.zeros((), device=device, dtype=torch.float64)
        engine.eval()
        try:
            with torch.no_grad():
                for batch in self.batches:
                    out = engine(**batch)
                    # The objective alone, as the training record's `loss`: aux losses are not held-out quality.
                    objective = out.loss.double() - sum(v.double() for v in (out.aux_losses or {}).values())
                    # The model's loss is a mean over labelled positions: weight it by their count.
                    labelled = (batch["labels"] != IGNORE).sum().double()
                    loss_sum += objective * labelled
                    tokens += labelled
        finally:
            engine.train()
        return {"eval/loss_sum": loss_sum, "eval/tokens": tokens}

    @staticmethod
    def metrics(summed: dict[str, float]) -> dict[str, float]:
        """eval/loss and eval/perplexity from the sums of every rank's `sums`."""
        loss = summed["eval/loss_sum"] / summed["eval/tokens"]
        return {"eval/loss": loss, "eval/perplexity": math.exp(loss) if loss < 700 else math.inf}
