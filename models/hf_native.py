"""zeroray models as `transformers`' own classes, where one computes the same function.

An exported folder of a native class loads with `transformers` alone (no `trust_remote_code`, no
zeroray installed), so every downstream tool (vLLM, TGI, PEFT, lm-evaluation-harness, llama.cpp's
converters) reads it. The mapping is checked by equal logits (tests/test_hf_native.py).

- `llama`, dense → `LlamaForCausalLM`: the same pre-norm blocks (RMSNorm ε 1e-6, rotate-half RoPE,
  SwiGLU, GQA, no biases), tied or untied embeddings.
- `llama` with `moe` → `Qwen2MoeForCausalLM`. Why Qwen2-MoE: its router is ours — softmax over all
  experts in fp32, then top-k, *without* renormalising the k weights (`norm_topk_prob: false`), and
  no QK-norm in attention (`qkv_bias: false` removes its biases). Mixtral renormalises the top-k
  weights and OLMoE normalises queries and keys, so neither computes our function. Qwen2-MoE always
  has a gated shared expert, sigmoid(x·w)·MLP(x): without `moe.shared_experts` it is exported with
  zero weights (its output is exactly 0); with n shared experts (DeepSeekMoE, ungated) it is their
  SwiGLU of n × the expert size with w = 0, so the gate is sigmoid(0) = 1/2 exactly, and the down
  projection doubled (a power of two: exact). Only a dropless model (`moe.capacity_factor: 0`)
  matches: transformers' MoE blocks drop no tokens. A model balanced by an expert bias
  (`moe.balance: bias|both`) does not: the bias changes which experts are chosen, and no
  transformers class selects by softmax + bias without renormalising the k weights (Ernie 4.5's
  MoE renormalises, DeepSeek-V3's scores by sigmoid); it exports with remote code.
- `bert`, `convbert`: zeroray's networks are transformers' ELECTRA and ConvBERT classes
  (models/convbert.py), so the weights go over under their own names. MLM → `ElectraForMaskedLM` /
  `ConvBertForMaskedLM`. Replaced-token detection → the discriminator, the model ELECTRA keeps for
  fine-tuning: `ElectraForPreTraining` (encoder + ELECTRA's replaced-token head, exactly zeroray's) for
  bert; for convbert `ConvBertModel`, the encoder alone (transformers has no ConvBERT class with a
  replaced-token head, so that head is left out; `ConvBertFor*.from_pretrained` fine-tunes from it).
  The generator goes to `generator/` as its own *ForMaskedLM (ELECTRA's releases ship it apart too).
  One difference, documented: zeroray's ConvBERT zeroes padded positions before its convolutions
  (models/convbert.py, fix 2); transformers' does not, so the two agree on unpadded input (every
  packed batch) and differ at the real positions next to padding.
- `hc_llm`, `widenet`, `charformer` have no `transformers` class: they export with remote code
  (models/hf.py).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel

# (family, pretraining) → the class of the exported model (the discriminator under rtd).
ENCODER_CLASSES = {("bert", "mlm"): "ElectraForMaskedLM", ("bert", "rtd"): "ElectraForPreTraining",
                   ("convbert", "mlm"): "ConvBertForMaskedLM", ("convbert", "rtd"): "ConvBertModel"}
GENERATOR_CLASSES = {"bert": "ElectraForMaskedLM", "convbert": "ConvBertForMaskedLM"}
GENERATOR_FOLDER = "generator"


def auto_class_name(class_name: str) -> str:
    """The `transformers` Auto factory that opens an exported native class."""
    return {"ElectraForPreTraining": "AutoModelForPreTraining", "ConvBertModel": "AutoModel",
            "ElectraForMaskedLM": "AutoModelForMaskedLM", "ConvBertForMaskedLM": "AutoModelForMaskedLM",
            }.get(class_name, "AutoModelForCausalLM")


def native_class_name(cfg: BaseModel) -> str | None:
    """The `transformers` class a model config exports to, or None (remote code)."""
    name = getattr(cfg, "name", None)
    if name in GENERATOR_CLASSES:
        return ENCODER_CLASSES[name, cfg.pretraining]
    if name != "llama":
        return None
    moe = cfg.moe
    if moe is None:
        return "LlamaForCausalLM"
    return "Qwen2MoeForCausalLM" if moe.capacity_factor == 0 and not moe.uses_bias else None


def _common(cfg) -> dict:
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=1e-6,  # models/layers/norms.RMSNorm's ε
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def _attention_and_norms(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"],
           "lm_head.weight": state.get("lm_head.weight", state["embed.weight"])}
    for i in range(n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out[theirs + "input_layernorm.weight"] = state[ours + "attn_norm.weight"]
        out[theirs + "post_attention_layernorm.weight"] = state[ours + "mlp_norm.weight"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{theirs}self_attn.{proj}.weight"] = state[f"{ours}attn.{proj}.weight"]
    return out


def to_native(cfg: BaseModel, state: dict[str, torch.Tensor]):
    """(transformers config, state dict under its names) for a model config with a native class.
    `state` is zeroray's full (consolidated) state dict."""
    import transformers

    name = native_class_name(cfg)
    if name is None:
        raise ValueError(f"model {cfg.name!r} has no native transformers class")
    if cfg.name in GENERATOR_CLASSES:
        return cfg.hf_config(), _encoder_weights(cfg, state)
    weights = _attention_and_norms(state, cfg.n_layers)
    if name == "LlamaForCausalLM":
        config = transformers.LlamaConfig(**_common(cfg), intermediate_size=cfg.mlp_hidden,
                                          attention_bias=False, mlp_bias=False)
        for i in range(cfg.n_layers):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                weights[f"model.layers.{i}.mlp.{proj}.weight"] = state[f"blocks.{i}.mlp.{proj}.weight"]
        return config, weights
    moe = cfg.moe
    config = transformers.Qwen2MoeConfig(
        **_common(cfg), intermediate_size=cfg.expert_hidden, moe_intermediate_size=cfg.expert_hidden,
        num_experts=moe.num_experts, num_experts_per_tok=moe.top_k, norm_topk_prob=False, qkv_bias=False,
        decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False,
        shared_expert_intermediate_size=moe.shared_experts * cfg.expert_hidden or 1,
        router_aux_loss_coef=moe.aux_loss_coef,
    )
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.mlp.", f"model.layers.{i}.mlp."
        weights[theirs + "gate.weight"] = state[ours + "router.weight"]
        # Ours: x @ w_gate[e] with w_gate [E, d, H]; theirs: linear(x, gate_up_proj[e]) with [E, 2H, d].
        weights[theirs + "experts.gate_up_proj"] = torch.cat(
            (state[ours + "w_gate"].transpose(1, 2), state[ours + "w_up"].transpose(1, 2)), dim=1).contiguous()
        weights[theirs + "experts.down_proj"] = state[ours + "w_down"].transpose(1, 2).contiguous()
        d = cfg.d_model
        if moe.shared_experts:  # gate sigmoid(0) = 1/2 times a doubled down projection: exactly ours
            for proj in ("gate_proj", "up_proj", "down_proj"):
                w = state[f"{ours}shared.{proj}.weight"]
                weights[f"{theirs}shared_expert.{proj}.weight"] = 2 * w if proj == "down_proj" else w
        else:
            weights[theirs + "shared_expert.gate_proj.weight"] = torch.zeros(1, d)
            weights[theirs + "shared_expert.up_proj.weight"] = torch.zeros(1, d)
            weights[theirs + "shared_expert.down_proj.weight"] = torch.zeros(d, 1)
        weights[theirs + "shared_expert_gate.weight"] = torch.zeros(1, d)
    return config, weights


def _encoder_weights(cfg, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The exported model's weights: the MLM model's, or the discriminator's (its head under ELECTRA's
    names; ConvBertModel has none). zeroray's prefixes: models.convbert.EncoderPretraining."""
    if cfg.pretraining == "mlm":
        return _strip(state, "mlm.")
    base = "electra." if cfg.name == "bert" else ""
    weights = {base + k: v for k, v in _strip(state, "discriminator.").items()}
    if cfg.name == "bert":
        weights.update({"discriminator_predictions." + k: v for k, v in _strip(state, "discriminator_head.").items()})
    return weights


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def _load(model_cls, config, weights: dict[str, torch.Tensor]):
    model = model_cls(config)  # on the CPU, not meta: rotary tables are buffers that are not loaded
    result = model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise ValueError(f"the {model_cls.__name__} export does not fit: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")
    if tied:
        model.tie_weights()
    return model.eval()


def build_native(cfg: BaseModel, state: dict[str, torch.Tensor]):
    """The `transformers` model with zeroray's weights loaded (fp32, eval mode)."""
    import transformers

    config, weights = to_native(cfg, state)
    return _load(getattr(transformers, native_class_name(cfg)), config, weights)


def build_native_generator(cfg: BaseModel, state: dict[str, torch.Tensor]):
    """The replaced-token-detection generator as its *ForMaskedLM (fp32, eval mode), or None (no
    generator: MLM, or not an encoder). Its embedding module is the discriminator's (ELECTRA's sharing),
    which a consolidated state dict may hold under the discriminator's names only."""
    import transformers

    if cfg.name not in GENERATOR_CLASSES or cfg.pretraining != "rtd":
        return None
    base = "electra." if cfg.name == "bert" else "convbert."
    weights = _strip(state, "generator.")
    for name, tensor in _strip(state, "discriminator.embeddings.").items():
        weights.setdefault(f"{base}embeddings.{name}", tensor)
    return _load(getattr(transformers, GENERATOR_CLASSES[cfg.name]), cfg.hf_config(generator=True), weights)
