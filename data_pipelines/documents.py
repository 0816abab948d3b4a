"""A logical stream's documents: its share of every source, tokenized, mixed, read epoch after epoch.

`datasets` does the heavy lifting: streaming reads, whole-shard splits (`split_dataset_by_node`),
batched on-the-fly tokenization (`map`), weighted mixing (`interleave_datasets`), the file order of
each epoch (`set_epoch`) and the position in the stream (`IterableDataset.state_dict`).

Each source is tokenized before the sources are mixed, so every row keeps the index of the source it
came from (per-source token counts) and why it is unusable, if it is (`data_pipelines.accounting`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
from datasets import Features, IterableDataset, List, Value, interleave_datasets
from datasets.distributed import split_dataset_by_node

from data_pipelines.accounting import EMPTY_DOCUMENT, RecordCounts, check_bad_data
from data_pipelines.config import DataConfig
from data_pipelines.sources import BAD_COLUMN, SourceError, open_source
from data_pipelines.tokenizer import ByteTokenizer, FileTokenizer, load_tokenizer

SOURCE_COLUMN = "__zeroray_source__"
TOKENIZED = Features({"input_ids": List(Value("int32")), SOURCE_COLUMN: Value("int32"), BAD_COLUMN: Value("string")})


class EmptyDataError(SourceError):
    """A whole pass over a stream's data produced no tokens."""


def open_sources(cfg: DataConfig) -> list[IterableDataset]:
    """Every source, opened (lazily) and checked: each must split into data.streams whole-shard subsets."""
    sources = [open_source(s, cfg.text_field) for s in cfg.sources]
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
    return sources


def stream_rows(cfg: DataConfig, streams: Iterable[int]) -> dict[int, IterableDataset]:
    """The tokenized rows (`TOKENIZED` columns) of each requested logical stream."""
    sources = open_sources(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer)
    return {i: _stream(cfg, sources, i, tokenizer) for i in streams}


def _stream(
    cfg: DataConfig, sources: list[IterableDataset], stream: int, tokenizer: ByteTokenizer | FileTokenizer
) -> IterableDataset:
    parts = []
    for index, ds in enumerate(sources):
        part = split_dataset_by_node(ds, rank=stream, world_size=cfg.streams)
        columns = part.column_names
        part = part.map(
            Tokenize(tokenizer, cfg.text_field, index), batched=True, batch_size=cfg.tokenize_batch,
            remove_columns=columns, features=TOKENIZED if columns else None,
        )
        if not columns:  # a source whose columns are unknown until read: keep ours only
            part = part.select_columns(list(TOKENIZED))
        parts.append(part)
    if len(parts) == 1:
        return parts[0]
    total = sum(s.weight for s in cfg.sources)
    return interleave_datasets(
        parts,
        probabilities=[s.weight / total for s in cfg.sources],
        # Each stream mixes with draws of its own: the same whatever worker reads it.
        seed=int(np.random.SeedSequence((cfg.seed, stream)).generate_state(1)[0]),
        stopping_strategy="all_exhausted",
    )


class Tokenize:
    """`map` function: one source's rows → token ids, the source's index, and why a row is unusable
    (None if usable). A class, not a closure: loader workers started by forkserver unpickle it."""

    def __init__(self, tokenizer: ByteTokenizer | FileTokenizer, text_field: str, source: int):
        self.tokenizer, self.text_field, self.source = tokenizer, text_field, source

    def __call__(self, batch: dict) -> dict:
        if self.text_field not in batch:
            raise SourceError(
                f"data.text_field: the data has no column {self.text_field!r} (columns: "
                f"{', '.join(c for c in batch if c != BAD_COLUMN)}); set data.text_field to the column that holds "
                f"the text"
            )
        texts = batch[self.text_field]
        bad = batch.get(BAD_COLUMN) or [None] * len(texts)
        kinds = [kind or (None if text else EMPTY_DOCUMENT) for text, kind in zip(texts, bad, strict=True)]
        encoded = iter(self.tokenizer.encode_batch([t for t, k in zip(texts, kinds, strict=True) if k is None]))
        return {
            "input_ids": [[] if k else next(encoded) for k in kinds],
            SOURCE_COLUMN: [self.source] * len(texts),
            BAD_COLUMN: kinds,
        }


def epoch_key(seed: int, epoch: int) -> int:
    """What `IterableDataset.set_epoch` gets: datasets shuffles the file order of every source with it
    (before the split into logical streams, so all streams must use the same key) and shifts the mixing
    draws. Keyed by data.seed too, and never 0 (epoch 0 would keep the file order)."""
    return int(np.random.SeedSequence((seed, epoch)).generate_state(1)[0]) | 1


class DocumentReader:
    """One logical stream's documents in order, epoch after epoch, with the position a resume needs and
    the records counted; unusable records are skipped (within data.bad_data)."""

    def __init__(self, cfg: DataConfig, index: int, rows: IterableDataset):
        self.cfg, self.index, self.rows = cfg, index, rows
        self.epoch = 0
        self.docs_in_epoch = 0
        self.counts = RecordCounts(len(cfg.sources))
        self._rows = None  # live iterator over self.rows; None = the epoch starts afresh
        self._loaded_position: dict | None = None  # see state_dict

    def next_document(self) -> list[int]:
        while True:
            if self._rows is None:
                self.rows.set_epoch(epoch_key(self.cfg.seed, self.epoch))
                # `iter(batch_size=1)`, not `iter(dataset)`: inside a DataLoader worker, datasets' __iter__
                # would split the shards again between the loader workers; this stream is this worker's whole.
                self._rows = self.rows.iter(batch_size=1)
                self.docs_in_epoch = 0
            try:
                row = next(self._rows)
            except StopIteration:
                self._end_epoch()
                continue
            self._loaded_position = None
            source, kind = row[SOURCE_COLUMN][0], row[BAD_COLUMN][0]
            if kind:
                self.counts.add_bad(source, kind)
                check_bad_data(self.cfg, self.index, self.counts, source, kind)
                continue
            ids = row["input_ids"][0]
            self.docs_in_epoch += 1
            self.counts.add_document(source, len(ids) + 1)  # + the end-of-document token
            return ids

    def _end_epoch(self) -> None:
        if self.docs_in_epoch == 0:
            bad = self.counts.bad_records
            raise EmptyDataError(
                f"data: a whole pass over logical stream {self.index} of {self.cfg.streams} (its share of "
                f"{', '.join(s.path for s in self.cfg.sources)}) produced no tokens"
                f"{f' ({bad} unusable record(s) so far)' if bad else ''}: are its files empty? Fill them, or use "
                f"fewer data.streams"
            )
        self.epoch += 1
        self._rows = None

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "docs_in_epoch": self.docs_in_epoch,
            # Between epochs there is no position to save: the next epoch starts from its beginning.
            "position": None if self._rows is None else self._position(),
            "counts": self.counts.state_dict(),
        }

    def _position(self) -> dict:
        # datasets 5.2: until the first example is read after `load_state_dict`, the dataset reports
        # the start of the epoch, not the loaded position (the iterator applies the state lazily). A
        # stream resumed and saved again before its next document (one long document spans many
        # steps) would restart its epoch, so the loaded position is kept until a document is read.
        if self._loaded_position is not None:
            return copy.deepcopy(self._loaded_position)
        return self.rows.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.docs_in_epoch = state["docs_in_epoch"]
        self.counts.load_state_dict(state["counts"])
        self._rows, self._loaded_position = None, None
        if state["position"] is not None:
            self.rows.set_epoch(epoch_key(self.cfg.seed, self.epoch))
            self.rows.load_state_dict(state["position"])
            self._rows = self.rows.iter(batch_size=1)
            self._loaded_position = copy.deepcopy(state["position"])
