"""Pre-training objectives: how packed token windows become a model's batch.

Every objective reads fixed-length windows from the packed token stream (documents joined by the
end-of-document token) and returns LongTensors; `labels` −100 marks positions without a target.

- `causal`: input_ids / labels shifted by one (windows of L + 1 tokens that overlap by one, so no
  token is lost as a target).
- `mlm` (BERT): ~mask_prob of the positions are selected; 80 % become the mask token, 10 % a random
  token, 10 % stay; labels hold the original token at the selected positions. ConvBERT/ELECTRA's
  replaced-token detection starts from these same inputs (the generator lives in the model).
- `span_corruption` (T5 / ByT5): noise spans of mean length `mean_span_length` cover
  `noise_density` of a raw window; each span becomes one sentinel in the encoder input and the
  decoder predicts "sentinel, span tokens" for every span, then the end token.

Special ids are appended after the tokenizer's V ids: pad = V, mask = V + 1, sentinel i = V + 2 + i.
Random draws come from a generator the caller seeds (per window: `data_pipelines.stream`), so a resumed
run, on any number of workers, draws the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

IGNORE = -100


class CausalObjective(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["causal"] = Field("causal", description="Next-token prediction over packed windows.")

    def special_tokens(self, seq_len: int) -> int:
        return 0

    def window(self, seq_len: int) -> tuple[int, int]:
        """(tokens per window, tokens to advance): windows overlap by one token."""
        return seq_len + 1, seq_len

    def rows(self, windows: np.ndarray, seq_len: int, vocab: int, eos_id: int, rng: np.random.Generator) -> dict:
        ids = torch.from_numpy(windows)
        return {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}


class MLMObjective(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["mlm"] = Field("mlm", description="BERT masked language modelling (80/10/10 masking).")
    mask_prob: float = Field(0.15, gt=0, lt=1, description="Share of positions selected for prediction.")

    def special_tokens(self, seq_len: int) -> int:
        return 2  # pad, mask

    def window(self, seq_len: int) -> tuple[int, int]:
        return seq_len, seq_len

    def rows(self, windows: np.ndarray, seq_len: int, vocab: int, eos_id: int, rng: np.random.Generator) -> dict:
        original = windows
        # Document separators are structure, not text: never selected (as HF's collator skips specials).
        selected = (rng.random(original.shape) < self.mask_prob) & (original != eos_id)
        action = rng.random(original.shape)
        inputs = original.copy()
        inputs[selected & (action < 0.8)] = vocab + 1  # the mask token
        randomised = selected & (action >= 0.8) & (action < 0.9)
        inputs[randomised] = rng.integers(0, vocab, size=int(randomised.sum()))
        labels = np.where(selected, original, IGNORE)
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}


class SpanCorruptionObjective(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["span_corruption"] = Field("span_corruption", description="T5 span corruption (encoder–decoder).")
    noise_density: float = Field(0.15, gt=0, lt=1, description="Share of the raw tokens that are corrupted.")
    mean_span_length: float = Field(
        20.0, ge=1, description="Mean corrupted span length (ByT5/Charformer: 20 bytes; T5 on subwords: 3)."
    )

    def lengths(self, seq_len: int) -> SpanLengths:
        return span_lengths(seq_len, self.noise_density, self.mean_span_length)

    def special_tokens(self, seq_len: int) -> int:
        return 2 + self.lengths(seq_len).spans  # pad, mask (unused here; kept so ids agree), sentinels

    def window(self, seq_len: int) -> tuple[int, int]:
        raw = self.lengths(seq_len).raw
        return raw, raw

    def rows(self, windows: np.ndarray, seq_len: int, vocab: int, eos_id: int, rng: np.random.Generator) -> dict:
        n = self.lengths(seq_len)
        pad = vocab
        encoder = np.full((len(windows), seq_len), pad, dtype=np.int64)
        labels = np.empty((len(windows), n.decoder), dtype=np.int64)
        for row, tokens in enumerate(windows):
            kept = _segment(n.raw - n.noise, n.spans, rng)
            noise = _segment(n.noise, n.spans, rng)
            enc_parts, dec_parts, pos = [], [], 0
            for i in range(n.spans):  # T5 starts with kept tokens, then alternates
                sentinel = [vocab + 2 + i]
                enc_parts += [tokens[pos : pos + kept[i]], sentinel]
                pos += kept[i]
                dec_parts += [sentinel, tokens[pos : pos + noise[i]]]
                pos += noise[i]
            enc_row = np.concatenate([*enc_parts, [eos_id]])
            encoder[row, : len(enc_row)] = enc_row
            labels[row] = np.concatenate([*dec_parts, [eos_id]])
        target = torch.from_numpy(labels)
        enc = torch.from_numpy(encoder)
        return {
            "input_ids": enc,
            "attention_mask": (enc != pad).long(),
            # T5: the decoder starts from the pad token and reads the targets shifted right.
            "decoder_input_ids": torch.cat([torch.full((len(windows), 1), pad), target[:, :-1]], dim=1),
            "labels": target,
        }


@dataclass(frozen=True)
class SpanLengths:
    raw: int
    """Tokens read from the stream per example."""
    noise: int
    spans: int
    encoder: int
    """Encoder input length before padding to seq_len: kept tokens + one sentinel per span + end."""
    decoder: int
    """Target length: noise tokens + one sentinel per span + end."""


@lru_cache(maxsize=64)
def span_lengths(seq_len: int, density: float, mean_span: float) -> SpanLengths:
    """T5's `random_spans_helper`: the longest raw window whose corrupted input fits in seq_len."""

    def at(raw: int) -> SpanLengths:
        noise = min(max(round(raw * density), 1), raw - 1)
        spans = max(round(noise / mean_span), 1)
        return SpanLengths(raw, noise, spans, raw - noise + spans + 1, noise + spans + 1)

    fitting = [at(raw) for raw in range(2, 4 * seq_len) if at(raw).encoder <= seq_len]
    usable = [n for n in fitting if n.raw - n.noise >= n.spans]  # every span needs kept tokens before it
    if not usable:
        raise ValueError(f"data.seq_len {seq_len} is too short for span corruption")
    return usable[-1]


def _segment(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`total` split into `parts` random positive lengths (T5's random segmentation)."""
    cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False)) if parts > 1 else np.array([], int)
    return np.diff(np.r_[0, cuts, total]).astype(int)


def segment_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """data.document_mask: which packed document each position of a causal row belongs to, counted from 0 in
    each row. The end-of-document token belongs to the document it ends; the next position starts another."""
    ends = (input_ids[:, :-1] == eos_id).long()
    return torch.cat([torch.zeros_like(input_ids[:, :1]), ends.cumsum(dim=1)], dim=1)


Objective = Annotated[
    CausalObjective | MLMObjective | SpanCorruptionObjective, Field(discriminator="kind")
]
