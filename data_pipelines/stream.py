"""Per-rank stream of packed training batches with exact resume.

`datasets` does the heavy lifting: streaming reads, sharding across ranks
(`split_dataset_by_node`), batched on-the-fly tokenization (`map`) and the position in the
stream (`IterableDataset.state_dict`). What it lacks is packing state: the tokens already read
but not yet emitted. `BatchStream` adds that, plus epochs, so a checkpoint resumes with
exactly the next batch.
"""

from __future__ import annotations

import numpy as np
import torch
from datasets import IterableDataset, interleave_datasets
from datasets.distributed import split_dataset_by_node

from data_pipelines.config import DataConfig
from data_pipelines.packing import Packer
from data_pipelines.sources import SourceError, open_source
from data_pipelines.tokenizer import load_tokenizer


class EmptyDataError(SourceError):
    """A whole pass over the data produced no tokens."""


def token_dataset(cfg: DataConfig, rank: int = 0, world: int = 1) -> IterableDataset:
    """Documents of this rank's share, tokenized on the fly into an `input_ids` column."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    parts = [split_dataset_by_node(open_source(s), rank=rank, world_size=world) for s in cfg.sources]
    if len(parts) == 1:
        docs = parts[0]
    else:
        total = sum(s.weight for s in cfg.sources)
        docs = interleave_datasets(
            [p.select_columns([cfg.text_field]) for p in parts],
            probabilities=[s.weight / total for s in cfg.sources],
            seed=cfg.seed,
            stopping_strategy="all_exhausted",
        )
    text_field = cfg.text_field

    def tokenize(batch: dict) -> dict:
        if text_field not in batch:
            raise SourceError(
                f"data.text_field: the data has no column {text_field!r} (columns: {', '.join(batch)}); "
                f"set data.text_field to the column that holds the text"
            )
        texts = [t for t in batch[text_field] if t]  # empty documents carry no tokens
        return {"input_ids": tokenizer.encode_batch(texts)}

    # remove_columns=None → drop whatever the source had; the batch size may change (empty docs).
    return docs.map(tokenize, batched=True, batch_size=cfg.tokenize_batch, remove_columns=_columns(docs))


def _columns(ds: IterableDataset) -> list[str] | None:
    # Parquet/arrow streams know their columns up front; json/text ones may not (None).
    return list(ds.column_names) if ds.column_names else None


class BatchStream:
    """Endless iterator of batches shaped by the objective (`data_pipelines.objectives`)."""

    def __init__(self, cfg: DataConfig, micro_batch: int, rank: int = 0, world: int = 1):
        self.cfg = cfg
        self.micro_batch = micro_batch
        self.rank = rank
        self.tokens = token_dataset(cfg, rank, world)
        tokenizer = load_tokenizer(cfg.tokenizer)
        self.vocab, self.eos_id = tokenizer.vocab_size, tokenizer.eos_id
        self.packer = Packer(*cfg.objective.window(cfg.seq_len), self.eos_id)
        self.batches = 0  # batches emitted: with the seed and rank it keys the objective's draws
        self.epoch = 0
        self._docs = None  # live iterator over self.tokens; None = the epoch starts afresh
        self._docs_in_epoch = 0

    def _next_window(self) -> list[int]:
        while (window := self.packer.pop()) is None:
            self._read_document()
        return window

    def _read_document(self) -> None:
        if self._docs is None:
            self.tokens.set_epoch(self.epoch)
            self._docs = iter(self.tokens)
            self._docs_in_epoch = 0
        try:
            example = next(self._docs)
        except StopIteration:
            if self._docs_in_epoch == 0:
                raise EmptyDataError(
                    f"data: a whole pass over {', '.join(s.path for s in self.cfg.sources)} produced no tokens "
                    f"for this rank (empty files, or fewer documents than ranks)"
                ) from None
            self.epoch += 1
            self._docs = None
            return
        self._docs_in_epoch += 1
        self.packer.add(example["input_ids"])

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        windows = np.array([self._next_window() for _ in range(self.micro_batch)], dtype=np.int64)
        # A generator per batch, keyed by position: a resumed run draws exactly the same masks.
        rng = np.random.default_rng((self.cfg.seed, self.rank, self.batches))
        self.batches += 1
        return self.cfg.objective.rows(windows, self.cfg.seq_len, self.vocab, self.eos_id, rng)

    # ---- exact resume ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "docs_in_epoch": self._docs_in_epoch,
            # Between epochs there is no position to save: the next epoch starts from its beginning.
            "stream": None if self._docs is None else self.tokens.state_dict(),
            "packer": self.packer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.batches = state["batches"]
        self.packer.load_state_dict(state["packer"])
        self._docs_in_epoch = state["docs_in_epoch"]
        self._docs = None
        if state["stream"] is not None:
            self.tokens.set_epoch(self.epoch)
            self.tokens.load_state_dict(state["stream"])
            self._docs = iter(self.tokens)
