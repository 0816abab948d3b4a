"""Text from a model: a prompt through the run's tokenizer, decoded by models/sampling.py, and back to text.

Used by `zeroray sample` (launcher/cmd_model.py) and, during training, by the evaluation steps
(`eval.sample_prompts`: trainer/hooks.py), so the two show a checkpoint's text the same way."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from data_pipelines.tokenizer import load_tokenizer
from models.sampling import generate, generate_seq2seq
from trainer.errors import ZerorayError

if TYPE_CHECKING:
    from trainer.spec import RunSpec

GENERATING = ("causal", "span_corruption")


def sample_texts(module, spec: RunSpec, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, num_samples: int = 1, stop_at_eos: bool = True) -> list[dict]:
    """Continuations of `prompt` by the module: [{"text", "ids"}] (the new text only).

    A causal model continues the prompt as a new document (documents are packed after an end-of-document
    token); an encoder–decoder (span corruption) fills in one span after the prompt. `stop_at_eos=False`
    decodes exactly max_new_tokens forward passes whatever is drawn (the text is still cut at the end
    token): under ZeRO-3 every rank must run the same forwards."""
    kind = spec.data.objective.kind
    if kind not in GENERATING:
        raise ZerorayError(f"model {spec.model.name} trains on {kind}: it fills in masked tokens and does not "
                           f"generate text; `zeroray eval` scores it")
    if max_new_tokens < 1 or num_samples < 1:
        raise ZerorayError("--max-new-tokens and --num-samples must be at least 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ZerorayError(f"--temperature must be ≥ 0 and --top-p in (0, 1]; got {temperature} and {top_p}")
    tokenizer = load_tokenizer(spec.data.tokenizer)
    tokens = tokenizer.encode_batch([prompt])[0]
    eos, vocab = tokenizer.eos_id, tokenizer.vocab_size
    stop = eos if stop_at_eos else None
    device = next(module.parameters()).device
    out = []
    for k in range(num_samples):
        if kind == "causal":
            ids = torch.tensor([[eos, *tokens]], device=device)
            new = generate(module, ids, max_new_tokens, temperature, top_p, seed + k, eos_id=stop)[0, ids.shape[1]:]
            kept = new.tolist()
            kept = kept[: kept.index(eos)] if eos in kept else kept
        else:  # span corruption: the prompt, then one sentinel for the span to fill, then the end token
            sentinel = vocab + 2
            limit = spec.model.max_seq_len - 2
            ids = torch.tensor([[*tokens[-limit:], sentinel, eos]], device=device)
            new = generate_seq2seq(module, ids, None, start_id=vocab, max_new_tokens=max_new_tokens + 1,
                                   temperature=temperature, top_p=top_p, seed=seed + k, eos_id=stop)[0, 1:]
            kept = new.tolist()
            kept = kept[1:] if kept and kept[0] == sentinel else kept  # the decoder names the span first
            end = next((i for i, t in enumerate(kept) if t == eos or t >= vocab), len(kept))
            kept = kept[:end][:max_new_tokens]
        out.append({"text": tokenizer.decode(kept), "ids": kept})
    return out


def prompt_samples(module, spec: RunSpec) -> list[dict]:
    """eval.sample_prompts continued greedily by eval.sample_tokens tokens each: [{"prompt", "text"}].
    Exactly the same forward passes on every rank (no stop at the end token), in eval mode."""
    was_training = module.training
    module.eval()
    try:
        return [{"prompt": p, "text": sample_texts(module, spec, p, spec.eval.sample_tokens, 0.0, 1.0, seed=0,
                                                   stop_at_eos=False)[0]["text"]}
                for p in spec.eval.sample_prompts]
    finally:
        module.train(was_training)
