"""Packing: documents joined by an end-of-document token, cut into fixed windows.

A window holds `window` tokens and the next one starts `stride` tokens later. The causal objective
uses window L + 1 and stride L, so consecutive windows share one token (inputs are the first L,
labels the last L) and no token is ever dropped as a prediction target; the other objectives use
disjoint windows.
"""

from __future__ import annotations

from data_pipelines.shuffle import WindowShuffle


class Packer:
    """Stateful: holds the tokens not yet emitted, so a checkpoint can carry them."""

    def __init__(self, window: int, stride: int, eos_id: int):
        if not 0 < stride <= window:
            raise ValueError(f"stride {stride} must be in 1..window ({window})")
        self.window, self.stride = window, stride
        self.eos_id = eos_id
        self.buffer: list[int] = []

    def add(self, ids: list[int]) -> None:
        self.buffer.extend(ids)
        self.buffer.append(self.eos_id)

    def pop(self) -> list[int] | None:
        """The next window, or None until enough tokens were added."""
        if len(self.buffer) < self.window:
            return None
        window = self.buffer[: self.window]
        del self.buffer[: self.stride]
        return window

    def state_dict(self) -> dict:
        return {"buffer": list(self.buffer)}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = list(state["buffer"])


class WindowMaker:
    """A logical stream's documents → its windows: packed, then (data.shuffle_buffer > 0) shuffled.

    A pure function of the documents it is given: the process that reads a stream and the training
    process (which keeps the state a checkpoint saves, `data_pipelines.stream`) run one each, fed the
    same documents, and stay identical."""

    def __init__(self, window: int, stride: int, eos_id: int, shuffle: WindowShuffle | None = None):
        self.packer = Packer(window, stride, eos_id)
        self.shuffle = shuffle
        self.windows = 0  # windows emitted: with the seed and the stream index it keys the random draws

    def add(self, ids: list[int]) -> None:
        self.packer.add(ids)

    def next_window(self) -> tuple[int, list[int]] | None:
        """(index of the window in the stream, its tokens), or None until more documents are added."""
        while (window := self.packer.pop()) is not None:
            if self.shuffle is not None and (window := self.shuffle.swap(window, self.windows)) is None:
                continue  # the shuffle buffer is still filling
            self.windows += 1
            return self.windows - 1, window
        return None

    def state_dict(self) -> dict:
        shuffle = None if self.shuffle is None else {"size": self.shuffle.size, "windows": self.shuffle.state_dict()}
        return {"windows": self.windows, "packer": self.packer.state_dict(), "shuffle": shuffle}

    def load_state_dict(self, state: dict) -> None:
        self.windows = state["windows"]
        self.packer.load_state_dict(state["packer"])
        if self.shuffle is not None:
            self.shuffle.load_state_dict(state["shuffle"]["windows"])
