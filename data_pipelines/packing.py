"""Causal-LM packing: documents joined by an end-of-document token, cut into fixed windows.

Window k holds tokens [k·L, k·L + L] of the document stream (L + 1 tokens), so inputs are the
first L and labels the last L: consecutive windows share one token and no token is ever dropped
as a prediction target.
"""

from __future__ import annotations


class Packer:
    """Stateful: holds the tokens not yet emitted, so a checkpoint can carry them."""

    def __init__(self, seq_len: int, eos_id: int):
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.buffer: list[int] = []

    def add(self, ids: list[int]) -> None:
        self.buffer.extend(ids)
        self.buffer.append(self.eos_id)

    def pop(self) -> list[int] | None:
        """The next window of seq_len + 1 tokens, or None until enough tokens were added."""
        if len(self.buffer) < self.seq_len + 1:
            return None
        window = self.buffer[: self.seq_len + 1]
        del self.buffer[: self.seq_len]
        return window

    def state_dict(self) -> dict:
        return {"buffer": list(self.buffer)}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = list(state["buffer"])
