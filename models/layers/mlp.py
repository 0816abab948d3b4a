import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden_size(d_model: int, multiple_of: int) -> int:
    """Llama's rule: 2/3 of 4·d, rounded up to a multiple (keeps parameters ≈ a 4·d GELU MLP)."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
