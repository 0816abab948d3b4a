"""Decoding with zeroray's own modules: greedy, temperature and nucleus (top-p) sampling.

Models whose config has `kv_cache_layers` decode with a key/value cache (`transformers`' DynamicCache,
which the layers take as it is): the prompt once, then one token per step. A prefix that outgrows the
module's max_seq_len is cut to its last max_seq_len tokens, and from then on every step runs the whole
window (rotary positions of a cut window are not those of the cache). The draws are made as `transformers` makes them —
logits / temperature, then top-p filtering as its TopPLogitsWarper (the smallest set of tokens whose
probability reaches top_p, at least one), then one multinomial draw — from a torch.Generator seeded
with `seed`, so the same seed decodes the same text on every run (and, on the CPU, the text
`generate(do_sample=True, top_k=0, temperature=T, top_p=P)` gives after `torch.manual_seed(seed)`).
temperature 0 is greedy decoding (argmax).
"""

from __future__ import annotations

import torch
from torch import nn


def filtered_logits(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """[batch, vocab] fp32 logits scaled by 1/temperature, with the tokens outside the top-p nucleus at −inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    scores = logits.float() / temperature
    if top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False  # the most likely token always stays
        scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return scores


def next_tokens(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of [batch, vocab] logits: argmax when temperature is 0, else a draw."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filtered_logits(logits, temperature, top_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def _finish(new: torch.Tensor, done: torch.Tensor, eos_id: int | None, pad_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that already ended get pad; a row ends at its eos."""
    if eos_id is None:
        return new, done
    new = torch.where(done, torch.full_like(new, eos_id if pad_id is None else pad_id), new)
    return new, done | (new == eos_id)


def _cache(module: nn.Module):
    """A fresh key/value cache for models that keep one, else None. `transformers` is imported here, not at the
    top: the trainer imports this module for its sample hook, and each rank would otherwise pay about half a
    second of CPU to import `transformers` at start-up."""
    if not getattr(module.config, "kv_cache_layers", 0):
        return None
    from transformers import DynamicCache

    return DynamicCache()


@torch.no_grad()
def generate(module: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, seed: int | None = None, eos_id: int | None = None,
             pad_id: int | None = None) -> torch.Tensor:
    """A causal module's continuation of `input_ids` [batch, T] → [batch, T + n], n ≤ max_new_tokens
    (decoding stops when every row has produced `eos_id`; rows that ended earlier are filled with
    `pad_id`, default eos). A prefix longer than the module's max_seq_len is cut to its last
    max_seq_len tokens for the forward (rotary scores depend only on distances)."""
    limit = getattr(module.config, "max_seq_len", None)
    generator = _generator(seed, input_ids.device)
    ids, done = input_ids, torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    cache = _cache(module)
    for _ in range(max_new_tokens):
        if cache is not None and (limit is None or ids.shape[1] <= limit):
            logits = module(ids[:, cache.get_seq_length():], cache=cache).logits
        else:
            logits = module(ids if limit is None else ids[:, -limit:]).logits
        new = next_tokens(logits[:, -1], temperature, top_p, generator)
        new, done = _finish(new, done, eos_id, pad_id)
        ids = torch.cat([ids, new[:, None]], dim=1)
        if bool(done.all()):
            break
    return ids


@torch.no_grad()
def generate_seq2seq(module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     start_id: int, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                     seed: int | None = None, eos_id: int | None = None, pad_id: int | None = None) -> torch.Tensor:
    """An encoder–decoder module (`encode`, `decode`: Charformer) — the encoder runs once, the decoder
    from `start_id` (with a cache of its self-attention when the family has one) → decoder ids
    [batch, 1 + n], starting with start_id."""
    limit = getattr(module.config, "max_seq_len", None)
    generator = _generator(seed, input_ids.device)
    memory, memory_mask = module.encode(input_ids, attention_mask)
    ids = torch.full((input_ids.shape[0], 1), start_id, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    cache = _cache(module)
    for _ in range(max_new_tokens if limit is None else min(max_new_tokens, limit - 1)):
        if cache is None:
            logits = module.decode(ids, memory, memory_mask)
        else:
            logits = module.decode(ids[:, cache.get_seq_length():], memory, memory_mask, cache=cache)
        new = next_tokens(logits[:, -1], temperature, top_p, generator)
        new, done = _finish(new, done, eos_id, pad_id)
        ids = torch.cat([ids, new[:, None]], dim=1)
        if bool(done.all()):
            break
    return ids
