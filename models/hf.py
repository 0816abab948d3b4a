"""`transformers` wrappers, so an exported zeroray model opens with AutoConfig / AutoModelFor….

The wrapped module is the very class zeroray trains (no re-implementation that could drift); the
config carries zeroray's model section. The Auto class follows from what the model trains on:
causal → AutoModelForCausalLM, mlm → AutoModelForMaskedLM, span_corruption →
AutoModelForSeq2SeqLM; AutoModel gives the same wrapper. Importing this module registers the
classes with the Auto factories; an exported folder also names them in `auto_map` for
`trust_remote_code=True` loading.

The causal and seq2seq wrappers are `GenerationMixin` models: `generate()` decodes greedily, by
sampling or by beam search, with a key/value cache: generate() builds transformers' DynamicCache
(EncoderDecoderCache for Charformer, whose decoder's self-attention fills it) and zeroray's attention
layers append to it (models.layers.attention.KVCache), so each step runs only the new token.
`num_hidden_layers` in the config is the number of cached layers, which DynamicCache sizes itself by.
A model whose config has no `kv_cache_layers` (e.g. an MoE that drops tokens by capacity) generates
with use_cache off: the whole prefix each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    DynamicCache,
    EncoderDecoderCache,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast, Seq2SeqLMOutput
from transformers.utils import ModelOutput

import models
from models.output import IGNORE_INDEX


def objective_of(model_name: str) -> str:
    """The objective a family trains on first: causal, mlm or span_corruption."""
    return models.entry(model_name).config_cls.objectives[0]


class ZerorayConfig(PretrainedConfig):
    model_type = "zeroray"

    def __init__(self, zeroray_model: dict | None = None, **kwargs):
        self.zeroray_model = dict(zeroray_model or {})
        if "vocab_size" in self.zeroray_model:
            kwargs.setdefault("vocab_size", self.zeroray_model["vocab_size"])
        if "name" in self.zeroray_model:  # an encoder–decoder family generates through its encoder's output
            kwargs.setdefault("is_encoder_decoder", objective_of(self.zeroray_model["name"]) == "span_corruption")
        super().__init__(**kwargs)


class ZerorayPreTrainedModel(PreTrainedModel):
    """Holds zeroray's module as `model`; its forward takes the module's own batch keys."""

    config_class = ZerorayConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: ZerorayConfig):
        super().__init__(config)
        entry = models.entry(config.zeroray_model["name"])
        self.model = models.build(entry.config_cls.model_validate(config.zeroray_model))
        tied = getattr(self.model, "tied_parameters", dict)()
        # transformers ties (and de-duplicates on save) exactly what the module shares.
        self._tied_weights_keys = {f"model.{target}": f"model.{source}" for target, source in tied.items()}
        config.tie_word_embeddings = bool(tied)
        self.caches = self.model.config.kv_cache_layers > 0
        if self.caches:  # DynamicCache(config=…) makes one cache layer per hidden layer
            config.num_hidden_layers = self.model.config.kv_cache_layers
        if self.can_generate():  # the special ids export writes into the config (launcher/export.py)
            for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
                if getattr(config, key, None) is not None:
                    setattr(self.generation_config, key, getattr(config, key))
            self.generation_config.use_cache = self.caches
        self.post_init()

    def _init_weights(self, module) -> None:
        pass  # weights come from the checkpoint; zeroray's own init already ran in __init__

    def get_input_embeddings(self):
        return self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else self.model.embed

    def forward(self, **batch):
        return self.model(**batch)

    def _cache(self, past_key_values, use_cache: bool | None):
        """The cache a forward appends to: generate()'s, or a new one for a direct call (as transformers'
        decoders do: unless use_cache=False or while training)."""
        if not self.caches:
            return None
        if past_key_values is None and use_cache is not False and not self.training:
            past_key_values = DynamicCache(config=self.config)
        return past_key_values


class ZerorayForMaskedLM(ZerorayPreTrainedModel):
    """Labels as zeroray's mlm objective: the original token at masked positions, −100 elsewhere."""


@dataclass
class ZerorayEncoderOutput(ModelOutput):
    """The encoder's output and its mask: Charformer's GBST shortens the sequence (⌈L/d_s⌉ positions),
    so the mask the decoder's cross-attention needs is not the input's attention_mask."""

    last_hidden_state: torch.Tensor | None = None
    memory_mask: torch.Tensor | None = None


class _Encoder(nn.Module):
    """What `get_encoder()` returns for generate(): made on each call, so its reference to the module
    never registers a second copy of the weights in the wrapper's state dict."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        memory, mask = self.model.encode(input_ids, attention_mask)
        return ZerorayEncoderOutput(last_hidden_state=memory, memory_mask=mask)


class ZerorayForSeq2SeqLM(ZerorayPreTrainedModel, GenerationMixin):
    """input_ids / attention_mask for the encoder, decoder_input_ids and labels for the decoder (labels
    alone: decoder_input_ids are labels shifted right from decoder_start_token_id, as in T5).
    `generate(input_ids)` encodes once and decodes from decoder_start_token_id (Charformer: bytes in,
    bytes out)."""

    def get_encoder(self, modality: str | None = None):
        return _Encoder(self.model)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                encoder_outputs: ZerorayEncoderOutput | None = None, past_key_values=None,
                use_cache: bool | None = None, **kwargs) -> Seq2SeqLMOutput:
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("give decoder_input_ids or labels (the decoder's input is needed)")
            decoder_input_ids = self._shift_right(labels)
        if encoder_outputs is None:  # the training forward itself
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                             labels=labels)
            return Seq2SeqLMOutput(loss=out.loss, logits=out.logits)
        cache = self._cache(past_key_values, use_cache)
        if self.caches and cache is not None and not isinstance(cache, EncoderDecoderCache):
            cache = EncoderDecoderCache(cache, DynamicCache())  # the cross-attention part stays empty
        memory, memory_mask = encoder_outputs.last_hidden_state, encoder_outputs.memory_mask
        if cache is None:
            logits = self.model.decode(decoder_input_ids, memory, memory_mask)
        else:
            logits = self.model.decode(decoder_input_ids, memory, memory_mask, cache=cache.self_attention_cache)
        return Seq2SeqLMOutput(loss=self.model.loss(logits, labels), logits=logits, past_key_values=cache,
                               encoder_last_hidden_state=encoder_outputs.last_hidden_state)

    def _shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        start = self.config.decoder_start_token_id
        if start is None:
            raise ValueError("config.decoder_start_token_id is not set: pass decoder_input_ids")
        shifted = torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.config.pad_token_id if self.config.pad_token_id
                                   is not None else start)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, encoder_outputs=None, attention_mask=None,
                                      past_key_values=None, **kwargs) -> dict:
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        return {"decoder_input_ids": input_ids[:, past:], "encoder_outputs": encoder_outputs,
                "attention_mask": attention_mask, "past_key_values": past_key_values}


class ZerorayForCausalLM(ZerorayPreTrainedModel, GenerationMixin):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, past_key_values=None, use_cache: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """Labels follow `transformers`' convention: the same as input_ids, shifted inside.

        attention_mask (1 = token, 0 = padding) is honoured for left padding by the families that mask
        attention by document (llama, hc_llm): padding and text become two segments, and rotary scores
        depend only on distances, so each row scores as it would alone. Others refuse padding. With a
        cache, input_ids are the tokens after the cached ones and attention_mask covers both."""
        cache = self._cache(past_key_values, use_cache)
        extra = {} if cache is None else {"cache": cache}
        if attention_mask is not None and not bool(attention_mask.all()):
            if not self.model.config.supports_segment_ids:
                raise ValueError(f"model {self.model.config.name} cannot mask padding; generate one unpadded "
                                 f"prompt at a time (or prompts of one length)")
            out = self.model(input_ids, segment_ids=attention_mask.long(), **extra)
        else:
            out = self.model(input_ids, **extra)
        loss = None
        if labels is not None:
            logits = out.logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, past_key_values=cache)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask=None, past_key_values=None,
                                      **kwargs) -> dict:
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        return {"input_ids": input_ids[:, past:], "attention_mask": attention_mask, "past_key_values": past_key_values}


WRAPPERS = {"causal": (ZerorayForCausalLM, AutoModelForCausalLM),
            "mlm": (ZerorayForMaskedLM, AutoModelForMaskedLM),
            "span_corruption": (ZerorayForSeq2SeqLM, AutoModelForSeq2SeqLM)}


def wrapper_for(model_name: str) -> tuple[type[ZerorayPreTrainedModel], type]:
    """The wrapper class and the Auto factory for a model family (by its first objective)."""
    return WRAPPERS[objective_of(model_name)]


AutoConfig.register("zeroray", ZerorayConfig)
AutoModel.register(ZerorayConfig, ZerorayPreTrainedModel)
for _cls, _auto in WRAPPERS.values():
    _auto.register(ZerorayConfig, _cls)
