"""`data.shuffle_buffer`: a logical stream's windows, emitted in a seeded random order.

Why not `datasets`' `IterableDataset.shuffle()`: its buffer contents are not part of its
`state_dict` (documented: a resume loses them and refills the buffer with new data), so a resumed run
would skip data; and in 5.x, with several DataLoader workers each holding fewer shards than
`max_buffer_input_shards`, `load_state_dict` raised IndexError (FIELD-NOTES). Here the buffer is part
of the stream's state, and each draw comes from a generator keyed by (data.seed, stream, windows
emitted): the same on any worker, in any loader worker, before and after a resume.

The buffer first fills with `size` windows; from then on each new window takes the place of a
uniformly drawn one, which is emitted. Windows are held as int32 arrays (a Python list of ints takes
several times the memory).
"""

from __future__ import annotations

import numpy as np

# Part of the draw key, so the shuffle's draws are not the objective's (keyed by seed, stream, window).
_SHUFFLE = 0x5B1F


class WindowShuffle:
    def __init__(self, size: int, seed: int, stream: int):
        if size < 1:
            raise ValueError(f"shuffle buffer size {size} must be at least 1")
        self.size, self.seed, self.stream = size, seed, stream
        self.buffer: list[np.ndarray] = []

    def swap(self, window: list[int], emitted: int) -> list[int] | None:
        """Take `window`; return the window to emit as the stream's window number `emitted`, or None
        while the buffer fills."""
        incoming = np.asarray(window, dtype=np.int32)
        if len(self.buffer) < self.size:
            self.buffer.append(incoming)
            return None
        slot = int(np.random.default_rng((self.seed, self.stream, emitted, _SHUFFLE)).integers(self.size))
        out, self.buffer[slot] = self.buffer[slot], incoming
        return out.tolist()

    def state_dict(self) -> list[list[int]]:
        return [w.tolist() for w in self.buffer]

    def load_state_dict(self, state: list[list[int]]) -> None:
        if len(state) > self.size:
            raise ValueError(f"a saved shuffle buffer holds {len(state)} windows, more than its size {self.size}")
        self.buffer = [np.asarray(w, dtype=np.int32) for w in state]
