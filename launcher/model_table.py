"""`zeroray models`: size and cost of each config's model, built on the meta device (no memory)."""

from __future__ import annotations

from pathlib import Path

import torch

import models
from trainer.spec import load_spec, read_yaml

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def model_rows(configs: list[str]) -> list[dict]:
    paths = [Path(c) for c in configs] or sorted(CONFIGS.glob("*.yaml"))
    rows = []
    for path in paths:
        # The tokenizer only sets the vocabulary; bytes keeps this usable before `zeroray data prepare`.
        overrides = [] if _tokenizer_exists(path) else ["data.tokenizer=bytes"]
        spec = load_spec(path, overrides)
        with torch.device("meta"):
            model = models.build(spec.model)
        rows.append({
            "config": path.name,
            "model": spec.model.name,
            "summary": models.entry(spec.model.name).summary,
            "params": model.num_parameters(),
            "active_params": model.num_active_parameters(),
            "flops_per_token": spec.flops_per_token(model),
            "seq_len": spec.data.seq_len,
            "vocab_size": spec.model.vocab_size,
        })
    return rows


def _tokenizer_exists(path: Path) -> bool:
    tokenizer = (read_yaml(path).get("data") or {}).get("tokenizer", "bytes")
    return tokenizer == "bytes" or Path(tokenizer).is_file()
