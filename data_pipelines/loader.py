"""Reading and tokenizing off the training thread: `data.loader_workers` torch DataLoader workers.

A worker's owned logical streams are dealt to its loader workers as streams are dealt to workers:
loader worker k of K reads the owned streams at positions k, k + K, … and yields one window of each in
turn. torch's DataLoader takes items from its workers round-robin in a fixed order, so the rows come
in exactly the order the training process would read them itself (owned stream 0, 1, 2, … then again).

Each item is one window of one stream (its objective row already drawn, keyed by (seed, stream,
window)) plus what the training process needs to keep that stream's state: the documents the stream
read for it (which the training process packs again, `packing.WindowMaker`, to hold the packer and
shuffle buffers without shipping them whole every window) and the reader's state after them. Workers
prefetch ahead; the state the training process saves is that of the rows it has taken, so
`BatchStream.state_dict()` between optimizer steps is exact.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import pickle
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow
import torch
from torch.utils.data import DataLoader, get_worker_info

from data_pipelines.config import DataConfig
from data_pipelines.documents import DocumentReader, stream_rows
from data_pipelines.objectives import segment_ids
from data_pipelines.packing import WindowMaker
from data_pipelines.shuffle import WindowShuffle
from data_pipelines.sources import SourceError
from data_pipelines.tokenizer import load_tokenizer


@dataclass
class WindowItem:
    stream: int
    index: int
    """The window's index in its stream."""
    row: dict[str, np.ndarray]
    """The objective's row. numpy, not torch: torch pickles a tensor between processes through a shared-memory
    segment of its own, far slower than inline bytes for a few KiB."""
    docs: list[np.ndarray]
    """Documents the stream read (and packed) before emitting this window, in order."""
    reader: dict | None
    """The stream's reader state after them; None when no document was read (unchanged)."""


@dataclass
class WorkerFailure:
    """A problem with the data (bad records, a source, a damaged file) met in a loader worker: shipped as an
    item so that the training process raises it as is (torch's re-raise would add the worker's traceback
    to the message, which only a bug in the code needs)."""

    error: Exception


def window_maker(cfg: DataConfig, stream: int, eos_id: int) -> WindowMaker:
    window, stride = cfg.objective.window(cfg.seq_len)
    shuffle = WindowShuffle(cfg.shuffle_buffer, cfg.seed, stream) if cfg.shuffle_buffer else None
    return WindowMaker(window, stride, eos_id, shuffle)


class StreamWindows(torch.utils.data.IterableDataset):
    """Endless windows of the given logical streams, one of each in turn, from the given states."""

    def __init__(self, cfg: DataConfig, streams: list[int], states: dict[int, dict]):
        self.cfg, self.streams, self.states = cfg, streams, states

    def __iter__(self) -> Iterator[WindowItem | WorkerFailure]:
        info = get_worker_info()
        if info is None:
            yield from self._windows(self.streams)
            return
        try:
            yield from self._windows(self.streams[info.id :: info.num_workers])
        except (SourceError, OSError, pyarrow.ArrowException) as exc:  # the data's problems, not the code's
            try:
                pickle.dumps(exc)
            except Exception:
                raise exc from None  # torch's own re-raise then carries it
            yield WorkerFailure(exc)

    def _windows(self, streams: list[int]) -> Iterator[WindowItem]:
        cfg = self.cfg
        tokenizer = load_tokenizer(cfg.tokenizer)
        vocab, eos_id = tokenizer.vocab_size, tokenizer.eos_id
        readers, makers = {}, {}
        for i, rows in stream_rows(cfg, streams).items():
            readers[i], makers[i] = DocumentReader(cfg, i, rows), window_maker(cfg, i, eos_id)
            if i in self.states:
                readers[i].load_state_dict(self.states[i])
                makers[i].load_state_dict(self.states[i])
        while True:
            for i in streams:
                reader, maker, docs = readers[i], makers[i], []
                while (out := maker.next_window()) is None:
                    ids = reader.next_document()
                    maker.add(ids)
                    docs.append(np.asarray(ids, dtype=np.int32))
                index, window = out
                rng = np.random.default_rng((cfg.seed, i, index))
                row = cfg.objective.rows(np.array([window], dtype=np.int64), cfg.seq_len, vocab, eos_id, rng)
                if cfg.document_mask:
                    row["segment_ids"] = segment_ids(row["input_ids"], eos_id)
                row = {k: v.numpy() for k, v in row.items()}
                yield WindowItem(i, index, row, docs, reader.state_dict() if docs else None)


def _as_is(item):
    return item


def _context() -> multiprocessing.context.BaseContext:
    # forkserver, not fork: by the time the loader starts, the training process runs threads (gloo's,
    # DeepSpeed's, torch's intra-op pool, the Rust tokenizer's pool, datasets' prefetch threads), and a
    # forked child inherits whatever locks they held, so it can deadlock. spawn is safe too, but every
    # loader worker would import torch and datasets afresh (seconds each); forkserver forks them from one
    # clean server process that has imported this module once (the preload).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def start_server() -> None:
    """Start the fork server now: it imports torch and datasets (seconds) in the background while the
    training process loads its checkpoint, instead of on the first batch."""
    _context()
    multiprocessing.forkserver.ensure_running()


def open_items(dataset: StreamWindows, loader_workers: int, rows_per_batch: int) -> Iterator:
    """The dataset's items, read in this process (0) or by `loader_workers` DataLoader workers."""
    if loader_workers == 0:
        return iter(dataset)
    loader = DataLoader(
        dataset,
        batch_size=None,  # items are single windows; BatchStream stacks a micro-batch itself
        num_workers=loader_workers,
        collate_fn=_as_is,
        multiprocessing_context=_context(),
        # About two micro-batches in flight over all loader workers, so a step never waits on one window.
        prefetch_factor=max(2, -(-2 * rows_per_batch // loader_workers)),
    )
    return iter(loader)
