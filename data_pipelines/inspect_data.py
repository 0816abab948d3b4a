"""`zeroray data inspect`: what the model will be fed, before a run spends compute on it.

Per source, over a sample of its first records: documents and tokens per document, unusable records
by kind (`data_pipelines.accounting`), the configured mixing share and the share of tokens it would
contribute. Then what the mixed logical streams actually read over their first windows (tokens per
source, unusable records: the counters a run reports as `data/...` metrics), and the first batch of
the objective, decoded, with its share of real tokens (packing efficiency: 100 % for packed
causal/MLM windows; span corruption pads the encoder input to seq_len)."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

from data_pipelines.config import DataConfig
from data_pipelines.documents import Tokenize
from data_pipelines.sources import BAD_COLUMN, open_source
from data_pipelines.stream import BatchStream
from data_pipelines.tokenizer import load_tokenizer

MIXED_WINDOWS = 32
"""Windows per logical stream read to measure the mixed streams' token shares."""


@dataclass(frozen=True)
class SourceSample:
    name: str
    path: str
    weight_share: float
    records: int
    bad: dict[str, int]
    """Unusable records among them, by kind (empty documents included)."""
    tokens_per_doc_mean: float
    tokens_per_doc_median: float
    tokens_per_doc_max: int
    token_share: float
    """Expected share of the mixed stream's tokens: weight share × mean document length, normalised."""


def inspect_sources(cfg: DataConfig, records_per_source: int = 200) -> list[SourceSample]:
    tokenizer = load_tokenizer(cfg.tokenizer)
    total_weight = sum(s.weight for s in cfg.sources)
    rows = []
    for index, src in enumerate(cfg.sources):
        sample = list(open_source(src, cfg.text_field).take(records_per_source))
        columns = {c for r in sample for c in r}
        # The training run's own tokenization, so the bad records are those it would skip.
        out = Tokenize(tokenizer, cfg.text_field, index)({c: [r.get(c) for r in sample] for c in columns})
        bad = Counter(k for k in out[BAD_COLUMN] if k)
        lengths = [len(ids) for ids, k in zip(out["input_ids"], out[BAD_COLUMN], strict=True) if not k] or [0]
        rows.append((src, len(sample), dict(sorted(bad.items())), lengths))
    volume = [src.weight / total_weight * statistics.mean(lengths) for src, _, _, lengths in rows]
    return [
        SourceSample(
            name=src.label, path=src.path, weight_share=src.weight / total_weight, records=n, bad=bad,
            tokens_per_doc_mean=statistics.mean(lengths), tokens_per_doc_median=statistics.median(lengths),
            tokens_per_doc_max=max(lengths), token_share=v / sum(volume) if sum(volume) else 0.0,
        )
        for (src, n, bad, lengths), v in zip(rows, volume, strict=True)
    ]


def mixed_reading(cfg: DataConfig, windows: int = MIXED_WINDOWS) -> tuple[dict, dict[str, float]]:
    """The first batch (one window from each logical stream: a one-worker step of `data.streams` rows)
    and the stream's metrics after `windows` windows of every logical stream."""
    stream = BatchStream(cfg.model_copy(update={"loader_workers": 0}), cfg.streams, rank=0, world=1)
    batch = next(stream)
    for _ in range(windows - 1):
        next(stream)
    return batch, stream.metrics()


def lines(cfg: DataConfig, samples: int = 2) -> list[str]:
    out = [f"tokenizer: {cfg.tokenizer}   objective: {cfg.objective.kind}   seq_len: {cfg.seq_len}   "
           f"streams: {cfg.streams}"]
    for s in inspect_sources(cfg):
        bad = ", ".join(f"{k} {n}" for k, n in s.bad.items()) or "none"
        out.append(
            f"source {s.name} ({s.path}): weight share {s.weight_share:.1%}, expected token share "
            f"{s.token_share:.1%}; {s.records} records sampled, unusable: {bad}; tokens/document mean "
            f"{s.tokens_per_doc_mean:.0f}, median {s.tokens_per_doc_median:.0f}, max {s.tokens_per_doc_max}"
        )
    batch, metrics = mixed_reading(cfg)
    tokens = {k.removeprefix("data/tokens/"): v for k, v in metrics.items() if k.startswith("data/tokens/")}
    total = sum(tokens.values()) or 1.0
    bad = ", ".join(f"{k.removeprefix('data/bad/')} {v:.0f}" for k, v in metrics.items()
                    if k.startswith("data/bad/") and v) or "none"
    out.append(
        f"mixed streams, first {MIXED_WINDOWS} windows of each: {metrics['data/documents']:.0f} documents; token "
        f"share {', '.join(f'{name} {n / total:.1%}' for name, n in tokens.items())}; unusable records: {bad}"
    )
    mask = batch.get("attention_mask")
    efficiency = 1.0 if mask is None else mask.float().mean().item()
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in batch.items())
    out.append(f"first batch: {shapes}; packing efficiency (real tokens) {efficiency:.1%}")
    tokenizer = load_tokenizer(cfg.tokenizer)
    for row in range(min(samples, len(batch["input_ids"]))):
        ids = [i for i in batch["input_ids"][row].tolist() if i < tokenizer.vocab_size]
        text = tokenizer.decode(ids).replace("\n", "⏎")
        out.append(f"sample {row}: {text[:300]!r}")
    return out
