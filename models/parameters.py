"""Rules every model family shares for its parameters: counting, initialisation, weight decay."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def count_parameters(module: nn.Module) -> int:
    """Parameters of `module`, tied and shared weights once (`parameters()` yields each once)."""
    return sum(p.numel() for p in module.parameters())


def init_normal(module: nn.Module, std: float) -> None:
    """Normal weights and zero biases for matmul-like layers (for `Module.apply`)."""
    if isinstance(module, nn.Linear | nn.Embedding | nn.Conv1d):
        nn.init.normal_(module.weight, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def matrices_decay(name: str, p: nn.Parameter) -> bool:
    """nanoGPT's rule: decay every matrix (embeddings included), never norms or biases, and never a
    parameter marked `_no_weight_decay` (e.g. the static hyper-connection matrices)."""
    return p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)


def decay_param_groups(module: nn.Module, weight_decay: float,
                       decays: Callable[[str, nn.Parameter], bool] = matrices_decay) -> list[dict]:
    """Two optimizer groups, every trainable parameter in exactly one: `decays(name, p)` picks."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    decayed = {n: decays(n, p) for n, p in named}
    return [
        {"params": [p for n, p in named if decayed[n]], "weight_decay": weight_decay, "name": "decay"},
        {"params": [p for n, p in named if not decayed[n]], "weight_decay": 0.0, "name": "no_decay"},
    ]
