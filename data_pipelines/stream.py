"""Packed training batches whose order does not depend on the number of workers.

`datasets` does the heavy lifting: streaming reads, whole-shard splits (`split_dataset_by_node`),
batched on-the-fly tokenization (`map`) and the position in a stream
(`IterableDataset.state_dict`). On top of it:

- **Logical streams.** The data is cut into `data.streams` logical streams, a number fixed for the
  life of a run: stream i reads shard subset i of every source (whole shards, so every source's
  shard count must be a multiple of `data.streams`; several sources are mixed inside each stream
  with a seed of its own), packs its documents into windows and keeps its own position, packing
  buffer, epoch and window counter.
- **Global order.** Optimizer step k takes exactly G / streams consecutive windows from every
  stream (G = rows per step over all workers). Worker w of W reads the streams i with
  i % W == w, taking its rows round-robin over them (always from the owned stream that has
  emitted the fewest windows). So the *set* of windows in step k is the same for any worker count;
  only the order of rows inside a step changes, and a step averages the gradient over all its rows,
  so that order does not matter.
- **Objective draws.** The masks and spans of a window are drawn from a generator keyed by
  (data.seed, stream, window index in the stream): whichever worker reads a window draws the same.
- **State.** `state_dict()` holds one entry per owned stream and nothing about the worker. A resume
  on any worker count loads the union of all workers' states (`merge_states`); the streams must all
  have emitted the same number of windows, i.e. the state was saved between optimizer steps.

A stream is also the unit that DataLoader workers could later be dealt (as workers deal them to
ranks), which would keep the same order with off-thread tokenization.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import torch
from datasets import IterableDataset, interleave_datasets
from datasets.distributed import split_dataset_by_node

from data_pipelines.config import DataConfig
from data_pipelines.packing import Packer
from data_pipelines.sources import SourceError, open_source
from data_pipelines.tokenizer import ByteTokenizer, FileTokenizer, load_tokenizer


class EmptyDataError(SourceError):
    """A whole pass over a stream's data produced no tokens."""


class StreamStateError(ValueError):
    """A saved data state that cannot be resumed with this configuration; the message says why."""


def stream_datasets(cfg: DataConfig, streams: Iterable[int]) -> dict[int, IterableDataset]:
    """Documents of each requested logical stream, tokenized on the fly into an `input_ids` column."""
    sources = [open_source(s) for s in cfg.sources]
    for src, ds in zip(cfg.sources, sources, strict=True):
        if ds.num_shards % cfg.streams:
            raise SourceError(
                f"data source {src.path!r} has {ds.num_shards} shard(s) (files), which data.streams = "
                f"{cfg.streams} logical streams cannot share as whole shards: the shard count of every source "
                f"must be a multiple of data.streams, so that each stream reads its own files whatever the "
                f"number of workers. Set data.streams to a divisor of {ds.num_shards} (a multiple of the worker "
                f"count), or write the data as a multiple of {cfg.streams} files "
                f"(e.g. `zeroray data prepare --shards {cfg.streams}`)"
            )
    tokenizer = load_tokenizer(cfg.tokenizer)
    return {i: _tokenized(cfg, sources, i, tokenizer) for i in streams}


def _tokenized(
    cfg: DataConfig, sources: list[IterableDataset], stream: int, tokenizer: ByteTokenizer | FileTokenizer
) -> IterableDataset:
    parts = [split_dataset_by_node(s, rank=stream, world_size=cfg.streams) for s in sources]
    if len(parts) == 1:
        docs = parts[0]
    else:
        total = sum(s.weight for s in cfg.sources)
        docs = interleave_datasets(
            [p.select_columns([cfg.text_field]) for p in parts],
            probabilities=[s.weight / total for s in cfg.sources],
            # Each stream mixes with draws of its own: the same whatever worker reads it.
            seed=int(np.random.SeedSequence((cfg.seed, stream)).generate_state(1)[0]),
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


class LogicalStream:
    """One logical stream: its documents packed into windows, with everything a resume needs."""

    def __init__(self, cfg: DataConfig, index: int, tokens: IterableDataset, packer: Packer):
        self.cfg = cfg
        self.index = index
        self.tokens = tokens
        self.packer = packer
        self.windows = 0  # windows emitted: with the seed and the index it keys the objective's draws
        self.epoch = 0
        self._docs = None  # live iterator over self.tokens; None = the epoch starts afresh
        self._docs_in_epoch = 0
        self._loaded_position: dict | None = None  # see state_dict

    def next_window(self) -> tuple[int, list[int]]:
        """(index of the window in this stream, its tokens)."""
        while (window := self.packer.pop()) is None:
            self._read_document()
        self.windows += 1
        return self.windows - 1, window

    def _read_document(self) -> None:
        if self._docs is None:
            self.tokens.set_epoch(self.epoch)
            self._docs = iter(self.tokens)
            self._docs_in_epoch = 0
        try:
            example = next(self._docs)
            self._loaded_position = None
        except StopIteration:
            if self._docs_in_epoch == 0:
                raise EmptyDataError(
                    f"data: a whole pass over logical stream {self.index} of {self.cfg.streams} (its share of "
                    f"{', '.join(s.path for s in self.cfg.sources)}) produced no tokens: are its files empty? "
                    f"Fill them, or use fewer data.streams"
                ) from None
            self.epoch += 1
            self._docs = None
            return
        self._docs_in_epoch += 1
        self.packer.add(example["input_ids"])

    def state_dict(self) -> dict:
        return {
            "windows": self.windows,
            "epoch": self.epoch,
            "docs_in_epoch": self._docs_in_epoch,
            # Between epochs there is no position to save: the next epoch starts from its beginning.
            "position": None if self._docs is None else self._position(),
            "packer": self.packer.state_dict(),
        }

    def _position(self) -> dict:
        # datasets 5.2: until the first example is read after `load_state_dict`, the dataset reports
        # the start of the epoch, not the loaded position (the iterator applies the state lazily). A
        # stream resumed and saved again before its next document (one long document spans many
        # steps) would restart its epoch, so the loaded position is kept until a document is read.
        if self._loaded_position is not None:
            return copy.deepcopy(self._loaded_position)
        return self.tokens.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.windows = state["windows"]
        self.epoch = state["epoch"]
        self.packer.load_state_dict(state["packer"])
        self._docs_in_epoch = state["docs_in_epoch"]
        self._docs, self._loaded_position = None, None
        if state["position"] is not None:
            self.tokens.set_epoch(self.epoch)
            self.tokens.load_state_dict(state["position"])
            self._docs = iter(self.tokens)
            self._loaded_position = copy.deepcopy(state["position"])


class BatchStream:
    """Endless iterator of this worker's micro-batches, shaped by the objective (`data_pipelines.objectives`).

    `micro_batch` rows per batch, `grad_accum` batches per optimizer step on each of `world`
    workers: a step holds micro_batch × grad_accum × world rows, whatever mix of the three.
    """

    def __init__(self, cfg: DataConfig, micro_batch: int, rank: int = 0, world: int = 1, grad_accum: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        cfg.check_layout(micro_batch * grad_accum * world, world)
        self.cfg = cfg
        self.micro_batch = micro_batch
        self.rank, self.world = rank, world
        tokenizer = load_tokenizer(cfg.tokenizer)
        self.vocab, self.eos_id = tokenizer.vocab_size, tokenizer.eos_id
        window, stride = cfg.objective.window(cfg.seq_len)
        owned = range(rank, cfg.streams, world)
        self.streams = {
            i: LogicalStream(cfg, i, tokens, Packer(window, stride, self.eos_id))
            for i, tokens in stream_datasets(cfg, owned).items()
        }

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = [self._next_row() for _ in range(self.micro_batch)]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def _next_row(self) -> dict[str, torch.Tensor]:
        # Round-robin over the owned streams; the counts alone say whose turn it is, so a resume needs
        # no cursor and step boundaries fall where every stream has emitted the same number of windows.
        stream = min(self.streams.values(), key=lambda s: (s.windows, s.index))
        index, window = stream.next_window()
        rng = np.random.default_rng((self.cfg.seed, stream.index, index))
        return self.cfg.objective.rows(
            np.array([window], dtype=np.int64), self.cfg.seq_len, self.vocab, self.eos_id, rng
        )

    # ---- resume, on any worker count ------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-able: the owned streams' states (keys are the stream indices as strings)."""
        return {
            "num_streams": self.cfg.streams,
            "streams": {str(i): s.state_dict() for i, s in self.streams.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Load a state holding at least the owned streams (e.g. `merge_states` of every worker's
        state from one checkpoint, saved on any worker count); other streams are ignored."""
        if "num_streams" not in state:
            raise StreamStateError(
                "the saved data state is per worker (written before data.streams existed) and cannot be "
                "resumed by logical streams; start the run afresh (`--fresh`)"
            )
        if state["num_streams"] != self.cfg.streams:
            raise StreamStateError(
                f"the saved data state has {state['num_streams']} logical streams but data.streams is "
                f"{self.cfg.streams}; data.streams is fixed for the life of a run: set it back to "
                f"{state['num_streams']}"
            )
        saved = {int(i): s for i, s in state["streams"].items()}
        missing = sorted(set(self.streams) - set(saved))
        if missing:
            raise StreamStateError(
                f"the saved data state lacks logical stream(s) {missing}, which worker {self.rank} of "
                f"{self.world} reads (it has {sorted(saved)}); load the union of every worker's saved data "
                f"state of one checkpoint (data_pipelines.stream.merge_states)"
            )
        windows = {i: s["windows"] for i, s in saved.items()}
        if len(set(windows.values())) > 1:
            raise StreamStateError(
                f"the saved logical streams are not at the same optimizer step (windows emitted per stream: "
                f"{dict(sorted(windows.items()))}); save the data state between optimizer steps, and merge "
                f"the states of one checkpoint only"
            )
        for i, stream in self.streams.items():
            stream.load_state_dict(saved[i])


def merge_states(states: Iterable[dict]) -> dict:
    """One data state from the per-worker states of one checkpoint (any worker count)."""
    merged: dict[str, dict] = {}
    counts = set()
    for state in states:
        counts.add(state["num_streams"])
        for i, s in state["streams"].items():
            if str(i) in merged and merged[str(i)] != s:
                raise StreamStateError(f"two saved data states disagree on logical stream {i}")
            merged[str(i)] = s
    if len(counts) != 1:
        raise StreamStateError(f"the saved data states have different numbers of logical streams: {sorted(counts)}")
    return {"num_streams": counts.pop(), "streams": dict(sorted(merged.items(), key=lambda kv: int(kv[0])))}
