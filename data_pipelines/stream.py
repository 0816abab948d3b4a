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
from data_pipelines.accounting import KINDS, RecordCounts
from data_pipelines.config import DataConfig
from data_pipelines.documents import EmptyDataError, open_sources, stream_rows
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
        tokenizer = load_tokenizer(cfg.tokenizer)
        eos_id, self._vocab = tokenizer.eos_id, tokenizer.vocab_size
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
        state from one checkpoint, saved on any worker count); other streams are ignored.

        The whole state is checked first (`_check_stream`): a damaged or truncated one is refused with
        StreamStateError naming the stream and the key, never loaded as far as it goes (a reader without
        its position would start its epoch again from the first record)."""
        check_state_layout(state)
        if state["num_streams"] != self.cfg.streams:
            raise StreamStateError(
                f"the saved data state has {state['num_streams']} logical streams but data.streams is "
                f"{self.cfg.streams}; data.streams is fixed for the life of a run: set it back to "
                f"{state['num_streams']}"
            )
        saved = {int(i): s for i, s in state["streams"].items()}
        templates = {i: rows.state_dict() for i, rows in stream_rows(self.cfg, self.owned).items()}
        for i, stream in saved.items():
            self._check_stream(i, stream, templates.get(i))
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

    def _check_stream(self, i: int, state: dict, template: dict | None) -> None:
        """Refuse a logical stream's saved state that this configuration could not have written: a missing,
        unknown or mistyped key, a negative count, a token id outside the vocabulary, a shuffled window of
        the wrong length, a reader position whose shape is not the one `datasets` writes for this stream
        (`template`: a fresh stream's position; None: the stream is not read here), or no position at all
        where the stream had read part of its epoch."""

        def damaged(what: str) -> StreamStateError:
            return StreamStateError(
                f"the saved data state of logical stream {i} is damaged: {what}; resume from an earlier "
                f"checkpoint (delete this one), or start afresh (`--fresh`)"
            )

        _keys(state, _STREAM_KEYS, f"stream {i}", damaged)
        for key in ("epoch", "docs_in_epoch", "windows"):
            _count(state[key], key, damaged)
        n_sources = len(self.cfg.sources)
        counts = state["counts"]
        _keys(counts, ("documents", "tokens", "bad"), "counts", damaged)
        for key in ("documents", "tokens", "bad"):
            if not isinstance(counts[key], list) or len(counts[key]) != n_sources:
                raise damaged(f"counts.{key} must list one entry per data source ({n_sources}), got "
                              f"{_shown(counts[key])}")
        for key in ("documents", "tokens"):
            for n, value in enumerate(counts[key]):
                _count(value, f"counts.{key}.{n}", damaged)
        for n, per_kind in enumerate(counts["bad"]):
            if not isinstance(per_kind, dict):
                raise damaged(f"counts.bad.{n} must map kinds of bad records to counts, got {_shown(per_kind)}")
            for kind, value in per_kind.items():
                if kind not in KINDS:
                    raise damaged(f"counts.bad.{n} counts an unknown kind {_shown(kind)} (known: {', '.join(KINDS)})")
                _count(value, f"counts.bad.{n}.{kind}", damaged)
        if sum(counts["documents"]) < state["docs_in_epoch"]:
            raise damaged(f"docs_in_epoch ({state['docs_in_epoch']}) exceeds the documents counted over the whole "
                          f"run ({sum(counts['documents'])})")
        packer = state["packer"]
        _keys(packer, ("buffer",), "packer", damaged)
        self._tokens(packer["buffer"], "packer.buffer", damaged)
        shuffle = state["shuffle"]
        if shuffle is not None:
            _keys(shuffle, ("size", "windows"), "shuffle", damaged)
            _count(shuffle["size"], "shuffle.size", damaged)
            if not isinstance(shuffle["windows"], list) or len(shuffle["windows"]) > shuffle["size"]:
                raise damaged(f"shuffle.windows must list at most shuffle.size ({shuffle['size']}) windows, got "
                              f"{_shown(shuffle['windows'])}")
            length = self.cfg.objective.window(self.cfg.seq_len)[0]
            for n, window in enumerate(shuffle["windows"]):
                self._tokens(window, f"shuffle.windows.{n}", damaged)
                if len(window) != length:
                    raise damaged(f"shuffle.windows.{n} holds {len(window)} tokens, not a window's {length}")
        position = state["position"]
        if position is None:
            fresh = state["epoch"] == 0 and state["docs_in_epoch"] == 0 and state["windows"] == 0
            between_epochs = state["epoch"] > 0 and state["docs_in_epoch"] > 0
            if not (fresh or between_epochs):
                raise damaged(
                    f"position (where the stream reads its sources) is missing, but the stream has read "
                    f"{state['docs_in_epoch']} document(s) of epoch {state['epoch']} and emitted {state['windows']} "
                    f"window(s): it would read its epoch again from the first record"
                )
        elif not isinstance(position, dict):
            raise damaged(f"position must be the reader's saved position (a mapping), got {_shown(position)}")
        elif template is not None:
            _same_shape(position, template, "position", damaged)

    def _tokens(self, ids, where: str, damaged) -> None:
        if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < self._vocab for t in ids):
            bad = next((t for t in ids if not (type(t) is int and 0 <= t < self._vocab)), ids) \
                if isinstance(ids, list) else ids
            raise damaged(f"{where} must list token ids in 0..{self._vocab - 1}, got {_shown(bad)}")


_STREAM_KEYS = ("epoch", "docs_in_epoch", "position", "counts", "windows", "packer", "shuffle")


def _shown(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _keys(value, expected: tuple[str, ...], where: str, damaged) -> None:
    if not isinstance(value, dict):
        raise damaged(f"{where} must be a mapping with {', '.join(expected)}, got {_shown(value)}")
    missing = [k for k in expected if k not in value]
    unknown = [k for k in value if k not in expected]
    if missing:
        raise damaged(f"{where} lacks {', '.join(missing)}")
    if unknown:
        raise damaged(f"{where} has unknown key(s) {', '.join(map(_shown, unknown))}")


def _count(value, where: str, damaged) -> None:
    if type(value) is not int or value < 0:
        raise damaged(f"{where} must be a count (a whole number ≥ 0), got {_shown(value)}")


def _same_shape(saved, template, where: str, damaged) -> None:
    """`saved` (a reader position) has the shape `datasets` gives `template`: the same keys, list lengths
    and kinds of value; its counters (ints) are ≥ 0; its iterable types are the same.

    Where the template holds None, a fresh reader has not reached that state yet: `previous_state` (datasets'
    MappedExamplesIterable: the state of its inner iterable at the last batch) then has the shape of the
    template's `examples_iterable`, and any other (`previous_states` of a mix of sources: one per source)
    is None or an iterable's state (`_iterable_state`)."""
    if template is None:
        if saved is not None:
            _iterable_state(saved, where, damaged)
        return
    if isinstance(template, dict):
        if not isinstance(saved, dict) or set(saved) != set(template):
            got = sorted(map(str, saved)) if isinstance(saved, dict) else _shown(saved)
            raise damaged(f"{where} does not have the reader's shape (keys {sorted(map(str, template))}, got {got})")
        for key in template:
            inner = template[key]
            if key == "previous_state" and inner is None and saved[key] is not None:
                inner = template.get("examples_iterable")
            _same_shape(saved[key], inner, f"{where}.{key}", damaged)
    elif isinstance(template, list):
        if not isinstance(saved, list) or len(saved) != len(template):
            raise damaged(f"{where} must list {len(template)} entries, got {_shown(saved)}")
        for n, (a, b) in enumerate(zip(saved, template, strict=True)):
            _same_shape(a, b, f"{where}.{n}", damaged)
    elif type(template) is int:
        _count(saved, where, damaged)
    elif type(saved) is not type(template) and not (type(template) is float and type(saved) is int):
        raise damaged(f"{where} must be a {type(template).__name__}, got {_shown(saved)}")
    elif where.endswith(".type") and saved != template:
        raise damaged(f"{where} is {_shown(saved)}, but this data pipeline reads with {_shown(template)}")


def _iterable_state(saved, where: str, damaged) -> None:
    """A datasets iterable's state where no template says more: a mapping with its `type`, whose counters
    (ints) are ≥ 0 and whose nested states are the same kind of thing."""
    if not isinstance(saved, dict) or not isinstance(saved.get("type"), str):
        raise damaged(f"{where} must be a reader's saved state (a mapping with its type), got {_shown(saved)}")

    def walk(value, at: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{at}.{key}")
        elif isinstance(value, list):
            for n, item in enumerate(value):
                walk(item, f"{at}.{n}")
        elif type(value) is int:
            _count(value, at, damaged)
        elif value is not None and not isinstance(value, str | bool | float):
            raise damaged(f"{at} is not part of a reader's saved state: {_shown(value)}")

    walk(saved, where)


def check_state_layout(state, what: str = "the saved data state") -> None:
    """The top level of a data state (format, num_streams, streams) or StreamStateError saying what is wrong."""
    if not isinstance(state, dict):
        raise StreamStateError(f"{what} is not a data state (a mapping of format, num_streams, streams), got "
                               f"{_shown(state)}; the checkpoint is damaged")
    if "num_streams" not in state:
        if "format" in state or "streams" in state or not state:
            raise StreamStateError(f"{what} lacks num_streams (it has {sorted(map(str, state)) or 'nothing'}); the "
                                   f"checkpoint is damaged: resume from an earlier one, or start afresh (`--fresh`)")
        raise StreamStateError(
            f"{what} is per worker (written before data.streams existed) and cannot be "
            "resumed by logical streams; start the run afresh (`--fresh`)"
        )
    if state.get("format") != STATE_FORMAT:
        raise StreamStateError(
            f"{what} has format {_shown(state.get('format', 1))} and this zeroray reads format "
            f"{STATE_FORMAT} (sources are now tokenized before they are mixed, so the saved positions do not "
            f"apply); start the run afresh (`--fresh`), or finish it with the zeroray that started it"
        )
    n = state["num_streams"]
    if type(n) is not int or n < 1:
        raise StreamStateError(f"{what} has num_streams {_shown(n)}, not a number of logical streams; the checkpoint "
                               f"is damaged")
    unknown = sorted(map(str, set(state) - {"format", "num_streams", "streams"}))
    if unknown:
        raise StreamStateError(f"{what} has unknown key(s) {', '.join(unknown)}; the checkpoint is damaged")
    streams = state.get("streams")
    if not isinstance(streams, dict):
        raise StreamStateError(f"{what} has no streams mapping (got {_shown(streams)}); the checkpoint is damaged")
    for key in streams:
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and int(key) < n):
            raise StreamStateError(f"{what} holds a stream {_shown(key)}, not one of its logical streams 0..{n - 1}; "
                                   f"the checkpoint is damaged")


def merge_states(states: Iterable[dict]) -> dict:
    """One data state from the per-worker states of one checkpoint (any worker count)."""
    merged: dict[str, dict] = {}
    counts, formats = set(), set()
    for rank, state in enumerate(states):
        check_state_layout(state, f"worker {rank}'s saved data state")
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
