"""`zeroray data inspect`: what the model will be fed, before a run spends compute on it.

Per source: documents and tokens per document over a sample, the configured mixing share and the
share of tokens it would contribute. Then the first batch of the objective, decoded, and how much
of it is real tokens (packing efficiency: 100 % for packed causal/MLM windows; span corruption pads
the encoder input to seq_len)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from data_pipelines.config import DataConfig
from data_pipelines.sources import open_source
from data_pipelines.stream import BatchStream
from data_pipelines.tokenizer import load_tokenizer


@dataclass(frozen=True)
class SourceSample:
    path: str
    weight_share: float
    documents: int
    empty: int
    tokens_per_doc_mean: float
    tokens_per_doc_median: float
    tokens_per_doc_max: int
    token_share: float
    """Share of the mixed stream's tokens: weight share × mean document length, normalised."""


def inspect_sources(cfg: DataConfig, docs_per_source: int = 200) -> list[SourceSample]:
    tokenizer = load_tokenizer(cfg.tokenizer)
    total_weight = sum(s.weight for s in cfg.sources)
    rows = []
    for src in cfg.sources:
        texts = []
        for example in open_source(src).take(docs_per_source):
            texts.append(example.get(cfg.text_field) or "")
        lengths = [len(ids) for ids in tokenizer.encode_batch([t for t in texts if t])] or [0]
        rows.append((src, len(texts), sum(1 for t in texts if not t), lengths))
    volume = [src.weight / total_weight * statistics.mean(lengths) for src, _, _, lengths in rows]
    return [
        SourceSample(
            path=src.path, weight_share=src.weight / total_weight, documents=n, empty=empty,
            tokens_per_doc_mean=statistics.mean(lengths), tokens_per_doc_median=statistics.median(lengths),
            tokens_per_doc_max=max(lengths), token_share=v / sum(volume) if sum(volume) else 0.0,
        )
        for (src, n, empty, lengths), v in zip(rows, volume, strict=True)
    ]


def first_batch(cfg: DataConfig) -> tuple[dict, float]:
    """One window from each logical stream (a one-worker step of `data.streams` rows), and its share
    of real (non-pad) tokens."""
    batch = next(BatchStream(cfg, cfg.streams, rank=0, world=1))
    mask = batch.get("attention_mask")
    efficiency = 1.0 if mask is None else mask.float().mean().item()
    return batch, efficiency


def lines(cfg: DataConfig, samples: int = 2) -> list[str]:
    out = [f"tokenizer: {cfg.tokenizer}   objective: {cfg.objective.kind}   seq_len: {cfg.seq_len}   "
           f"streams: {cfg.streams}"]
    for s in inspect_sources(cfg):
        out.append(
            f"source {s.path}: weight share {s.weight_share:.1%}, token share {s.token_share:.1%}; "
            f"{s.documents} documents sampled ({s.empty} empty), tokens/document mean {s.tokens_per_doc_mean:.0f}, "
            f"median {s.tokens_per_doc_median:.0f}, max {s.tokens_per_doc_max}"
        )
    batch, efficiency = first_batch(cfg)
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in batch.items())
    out.append(f"first batch: {shapes}; packing efficiency (real tokens) {efficiency:.1%}")
    tokenizer = load_tokenizer(cfg.tokenizer)
    for row in range(min(samples, len(batch["input_ids"]))):
        ids = [i for i in batch["input_ids"][row].tolist() if i < tokenizer.vocab_size]
        text = tokenizer.decode(ids).replace("\n", "⏎")
        out.append(f"sample {row}: {text[:300]!r}")
    return out
