"""Packed training batches whose order does not depend on the number of workers.

- **Logical streams.** The data is cut into `data.streams` logical streams, a number fixed for the
  life of a run: stream i reads shard subset i of every source (whole shards, so every source's
  shard count must be a multiple of `data.streams`; several sources are mixed inside each stream
  with a seed of its own), packs its documents into windows (optionally shuffled, `shuffle`) and
  keeps its own position, packing and shuffle buffers, epoch, window counter and record counts
  (`documents`, `packing`, `accounting`).
- **Global order.** Optimizer step k takes exactly G / streams consecutive windows from every
  stream (G = rows per step over all workers). Worker w of W reads the streams i with
  i % W == w, taking its rows round-robin over them. So the *set* of windows in step k is the same
  for any worker count; only the order of rows inside a step changes, and a step averages the
  gradient over all its rows, so that order does not matter.
- **Loader workers.** A worker's streams are read and tokenized by `data.loader_workers` DataLoader
  workers, dealt to them the same way (`loader`); the rows come in the same order as without them.
- **Random draws.** The masks and spans of a window, and the shuffle's draws, come from generators
  keyed by (data.seed, stream, window index in the stream): whichever worker reads a window draws
  the same.
- **State.** `state_dict()` holds one entry per owned stream and nothing about the worker. A resume
  on any worker count loads the union of all workers' states (`merge_states`); the streams must all
  have emitted the same number of windows, i.e. the state was saved between optimizer steps.
  The training process keeps each stream's state as of the rows it has taken (loader workers read
  ahead), so the state saved between two steps is exact.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator

import torch

from data_pipelines import accounting
from data_pipelines.accounting import RecordCounts
from data_pipelines.config import DataConfig
from data_pipelines.documents import EmptyDataError, open_sources
from data_pipelines.loader import StreamWindows, WorkerFailure, open_items, start_server, window_maker
from data_pipelines.tokenizer import load_tokenizer

__all__ = ["BatchStream", "EmptyDataError", "StreamStateError", "merge_states"]

STATE_FORMAT = 2
"""Version of the saved data state; 2: sources are tokenized before they are mixed, counts, shuffle."""


class StreamStateError(ValueError):
    """A saved data state that cannot be resumed with this configuration; the message says why."""


class BatchStream:
    """Endless iterator of this worker's micro-batches, shaped by the objective (`data_pipelines.objectives`).

    `micro_batch` rows per batch, `grad_accum` batches per optimizer step on each of `world`
    workers: a step holds micro_batch × grad_accum × world rows, whatever mix of the three.
    Loader workers start with the first batch, so `load_state_dict` before it costs nothing.
    """

    def __init__(self, cfg: DataConfig, micro_batch: int, rank: int = 0, world: int = 1, grad_accum: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        cfg.check_layout(micro_batch * grad_accum * world, world)
        self.cfg = cfg
        self.micro_batch = micro_batch
        self.rank, self.world = rank, world
        # Here, not only in the loader workers: a wrong path, a missing tokenizer or a source with too few
        # files fails at once, in the training process.
        eos_id = load_tokenizer(cfg.tokenizer).eos_id
        open_sources(cfg)
        self.owned = list(range(rank, cfg.streams, world))
        # Each owned stream's state as of the rows taken: the windows' side (packer, shuffle buffer, count)
        # is packed again here from the documents each item carries; the reader's side comes with the items.
        self._makers = {i: window_maker(cfg, i, eos_id) for i in self.owned}
        fresh = {"epoch": 0, "docs_in_epoch": 0, "position": None,
                 "counts": RecordCounts(len(cfg.sources)).state_dict()}
        self._readers = {i: copy.deepcopy(fresh) for i in self.owned}
        self._items: Iterator | None = None
        self._taken = 0  # rows taken since the items were opened: whose turn it is
        if cfg.loader_workers:
            start_server()

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = [self._next_row() for _ in range(self.micro_batch)]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def _next_row(self) -> dict[str, torch.Tensor]:
        if self._items is None:
            states = {i: self._stream_state(i) for i in self.owned}
            self._items = open_items(StreamWindows(self.cfg, self.owned, states), self.cfg.loader_workers,
                                     self.micro_batch)
            self._taken = 0
        item = next(self._items)
        if isinstance(item, WorkerFailure):
            raise item.error
        # Round-robin over the owned streams: every stream has emitted as many windows as the others when
        # the items open (a fresh start, or a state saved between optimizer steps).
        expected = self.owned[self._taken % len(self.owned)]
        maker = self._makers[item.stream]
        for doc in item.docs:
            maker.add(doc.tolist())
        packed = maker.next_window()
        if item.stream != expected or packed is None or packed[0] != item.index:
            raise RuntimeError(
                f"data loader out of step: got window {item.index} of stream {item.stream}, expected the next "
                f"window of stream {expected} ({'none' if packed is None else packed[0]} here); please report"
            )
        if item.reader is not None:
            self._readers[item.stream] = item.reader
        self._taken += 1
        return {k: torch.from_numpy(v) for k, v in item.row.items()}

    def metrics(self) -> dict[str, float]:
        """Cumulative counts of this worker's streams: `data/documents`, `data/tokens/<source>`,
        `data/bad/<kind>` (every source and kind, so ranks can sum them key by key)."""
        counts = []
        for state in self._readers.values():
            c = RecordCounts(len(self.cfg.sources))
            c.load_state_dict(state["counts"])
            counts.append(c)
        return accounting.metrics(self.cfg, counts)

    # ---- resume, on any worker count ------------------------------------------------------
    def _stream_state(self, i: int) -> dict:
        return {**copy.deepcopy(self._readers[i]), **self._makers[i].state_dict()}

    def state_dict(self) -> dict:
        """JSON-able: the owned streams' states (keys are the stream indices as strings)."""
        return {
            "format": STATE_FORMAT,
            "num_streams": self.cfg.streams,
            "streams": {str(i): self._stream_state(i) for i in self.owned},
        }

    def load_state_dict(self, state: dict) -> None:
        """Load a state holding at least the owned streams (e.g. `merge_states` of every worker's
        state from one checkpoint, saved on any worker count); other streams are ignored."""
        if "num_streams" not in state:
            raise StreamStateError(
                "the saved data state is per worker (written before data.streams existed) and cannot be "
                "resumed by logical streams; start the run afresh (`--fresh`)"
            )
        if state.get("format") != STATE_FORMAT:
            raise StreamStateError(
                f"the saved data state has format {state.get('format', 1)} and this zeroray reads format "
                f"{STATE_FORMAT} (sources are now tokenized before they are mixed, so the saved positions do not "
                f"apply); start the run afresh (`--fresh`), or finish it with the zeroray that started it"
            )
        if state["num_streams"] != self.cfg.streams:
            raise StreamStateError(
                f"the saved data state has {state['num_streams']} logical streams but data.streams is "
                f"{self.cfg.streams}; data.streams is fixed for the life of a run: set it back to "
                f"{state['num_streams']}"
            )
        saved = {int(i): s for i, s in state["streams"].items()}
        missing = sorted(set(self.owned) - set(saved))
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
        shuffle_sizes = {(s["shuffle"] or {}).get("size", 0) for s in saved.values()}
        if shuffle_sizes != {self.cfg.shuffle_buffer}:
            raise StreamStateError(
                f"the saved data state has shuffle buffers of {sorted(shuffle_sizes)} window(s) but "
                f"data.shuffle_buffer is {self.cfg.shuffle_buffer}; it is fixed for the life of a run (the buffers "
                f"are saved): set it back to {max(shuffle_sizes)}"
            )
        for i in self.owned:
            self._makers[i].load_state_dict(saved[i])
            self._readers[i] = {k: copy.deepcopy(saved[i][k]) for k in ("epoch", "docs_in_epoch", "position",
                                                                         "counts")}
        self._items = None  # (re)opened from these states with the next batch


def merge_states(states: Iterable[dict]) -> dict:
    """One data state from the per-worker states of one checkpoint (any worker count)."""
    merged: dict[str, dict] = {}
    counts, formats = set(), set()
    for state in states:
        counts.add(state["num_streams"])
        formats.add(state.get("format"))
        for i, s in state["streams"].items():
            if str(i) in merged and merged[str(i)] != s:
                raise StreamStateError(f"two saved data states disagree on logical stream {i}")
            merged[str(i)] = s
    if len(counts) != 1:
        raise StreamStateError(f"the saved data states have different numbers of logical streams: {sorted(counts)}")
    if len(formats) != 1:
        raise StreamStateError(f"the saved data states have different formats: {sorted(map(str, formats))}")
    return {"format": formats.pop(), "num_streams": counts.pop(), "streams": dict(sorted(merged.items(), key=lambda kv: int(kv[0])))}
