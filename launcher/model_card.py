"""The model card (README.md) of an export: architecture, parameters, tokens seen, the losses at the
checkpoint (from the run's metrics.jsonl), how to load it, and the resolved spec."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

import models
from models.hf_native import auto_class_name
from trainer.spec import RunSpec

if TYPE_CHECKING:
    from launcher.export import Located


def _at_checkpoint(records: list[dict], key: str, step: int) -> dict | None:
    """The last record with `key` at or before the checkpoint's step."""
    found = [r for r in records if isinstance(r.get(key), int | float) and r.get("step", 0) <= step]
    return found[-1] if found else None


def _figure(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M ({n:,})"


def model_card(spec: RunSpec, found: Located | None, info: dict, module: torch.nn.Module | None,
               folder: Path) -> str:
    """README.md of an export: architecture, parameters, tokens seen, the losses at the checkpoint (from the
    run's metrics.jsonl), how to load it, and the resolved spec."""
    from launcher.runs import read_metrics

    if module is None:
        with torch.device("meta"):  # counting only
            module = models.build(spec.model)
    m, step = spec.model, info["step"]
    records = read_metrics(found.run) if found and found.run else []
    train, held_out = _at_checkpoint(records, "loss", step), _at_checkpoint(records, "eval/loss", step)
    tokens = (train or {}).get("tokens") if train and train.get("step") == step else None
    tokens = tokens if isinstance(tokens, int | float) else step * spec.tokens_per_step
    name = spec.output.name or (found.run.root.name if found and found.run else m.name)
    params, active = module.num_parameters(), module.num_active_parameters()
    dump = m.model_dump(mode="json")
    shape = ", ".join(f"{k}={v}" for k, v in dump.items() if k != "name" and v is not None and not isinstance(v, dict))
    if isinstance(dump.get("moe"), dict):
        shape += "; moe: " + ", ".join(f"{k}={v}" for k, v in dump["moe"].items() if v is not None)
    objective = spec.data.objective.kind
    if info["remote_code"]:
        auto = {"causal": "AutoModelForCausalLM", "mlm": "AutoModelForMaskedLM",
                "span_corruption": "AutoModelForSeq2SeqLM"}[objective]
        load = (f"from transformers import {auto}\n"
                f"model = {auto}.from_pretrained(\"PATH\", trust_remote_code=True)  # zeroray installed")
        if objective == "mlm":
            generation = "A masked language model: no `generate()`."
        elif m.kv_cache_layers:
            generation = ("`generate()` (greedy, sampling, beam search) decodes with a key/value cache "
                          "(transformers' DynamicCache): the prompt once, then one token per step.")
        else:  # an MoE that drops tokens by capacity (models.family.FamilyConfig.cacheable)
            generation = ("`generate()` (greedy, sampling, beam search) decodes **without a KV cache**: the MoE "
                          "drops tokens by capacity, which depends on the whole sequence, so each new token runs "
                          "the whole prefix again (exact, slower for long outputs).")
    elif objective == "causal":
        load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                "model = AutoModelForCausalLM.from_pretrained(\"PATH\")  # transformers alone\n"
                "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")")
        generation = f"`{info['class']}` is transformers' own class: `generate()` uses its KV cache."
    else:  # bert / convbert (models.hf_native)
        auto = auto_class_name(info["class"])
        load = (f"from transformers import {auto}\n"
                f"model = {auto}.from_pretrained(\"PATH\")  # transformers alone")
        if m.pretraining == "rtd":
            load += ("\n# ELECTRA's generator, apart as in ELECTRA's releases:\n"
                     "from transformers import AutoModelForMaskedLM\n"
                     "generator = AutoModelForMaskedLM.from_pretrained(\"PATH/generator\")")
        generation = {
            "ElectraForPreTraining": "The replaced-token-detection discriminator: its logits say, per position, "
                                     "whether the token was replaced (positive = replaced), as in training.",
            "ConvBertModel": "The replaced-token-detection discriminator's encoder: transformers has no ConvBERT "
                             "class with ELECTRA's replaced-token head, so the head is not in the export; fine-tune "
                             "with `ConvBertForSequenceClassification.from_pretrained(\"PATH\")` and the like.",
        }.get(info["class"], "A masked language model: no `generate()`; `[MASK]` is the mask token.")
        if m.name == "convbert":
            generation += (" zeroray's ConvBERT zeroes padded positions before its convolutions and transformers' "
                           "does not: outputs agree on unpadded input and differ next to padding.")
    tokenizer = ("UTF-8 bytes: ids 0–255 are the bytes, 256 ends a document; the objective's pad, mask and "
                 "sentinels follow (257, 258, 259…)" if spec.data.tokenizer == "bytes"
                 else f"byte-level BPE (`tokenizer.json`, {Path(spec.data.tokenizer).name} of the run)")
    rows = [
        ("model family", f"`{m.name}`: {models.entry(m.name).summary}"),
        ("shape", shape),
        ("class", f"`{info['class']}`" + (" (remote code: `trust_remote_code=True`)" if info["remote_code"] else
                                          " (native transformers class)")),
        ("parameters", _millions(params) + (f"; active per token {_millions(active)}" if active != params else "")),
        ("objective", objective),
        ("tokens seen", f"{int(tokens):,} ({step} steps × {spec.tokens_per_step:,} tokens/step)"),
        ("checkpoint", f"step {step} of {spec.trainer.max_steps}" + (f" (`{info['checkpoint']}`)" if found else
                                                                     " (not trained: weights as initialised)")),
        ("train loss", f"{_figure((train or {}).get('loss'))} (step {train['step']})" if train else "–"),
        ("eval loss", f"{_figure(held_out['eval/loss'])} (step {held_out['step']}; perplexity "
                      f"{_figure(held_out.get('eval/perplexity'), 2)}"
                      + (f", bits per byte {_figure(held_out['eval/bits_per_byte'])}"
                         if isinstance(held_out.get("eval/bits_per_byte"), int | float) else "") + ")"
         if held_out else "–"),
        ("tokenizer", tokenizer),
        ("precision of the weights", "fp32 (consolidated from the DeepSpeed checkpoint)"),
    ]
    files = sorted(p.name for p in folder.iterdir())
    lines = [
        "---", "library_name: transformers", f"tags: [zeroray, {m.name}, {objective}]", "---", "",
        f"# {name}: {m.name}, exported by zeroray", "",
        "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
        "## Load", "", "```python", load, "```", "", generation, "",
        f"Files: {', '.join(files + ['README.md'])}.", "",
        "## Resolved run spec", "", "```yaml", spec.to_yaml().rstrip(), "```", "",
    ]
    return "\n".join(lines)
