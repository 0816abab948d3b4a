"""Packing: documents joined by an end-of-document token, cut into fixed windows.

A window holds `window` tokens and the next one starts `stride` tokens later. The causal objective
uses window L + 1 and stride L, so consecutive windows share one token (inputs are the first L,
labels the last L) and no token is ever dropped as a prediction target; the other objectives use
disjoint windows.
"""

from __future__ import annotations


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
