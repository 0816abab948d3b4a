"""`transformers` wrappers, so an exported zeroray model opens with AutoConfig / AutoModelFor….

The wrapped module is the very class zeroray trains (no re-implementation that could drift); the
config carries zeroray's model section. The Auto class follows from what the model trains on:
causal → AutoModelForCausalLM, mlm → AutoModelForMaskedLM, span_corruption →
AutoModelForSeq2SeqLM; AutoModel gives the same wrapper. Importing this module registers the
classes with the Auto factories; an exported folder also names them in `auto_map` for
`trust_remote_code=True` loading.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutput

import models
from models.output import IGNORE_INDEX


class ZerorayConfig(PretrainedConfig):
    model_type = "zeroray"

    def __init__(self, zeroray_model: dict | None = None, **kwargs):
        self.zeroray_model = dict(zeroray_model or {})
        if "vocab_size" in self.zeroray_model:
            kwargs.setdefault("vocab_size", self.zeroray_model["vocab_size"])
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
        self.post_init()

    def _init_weights(self, module) -> None:
        pass  # weights come from the checkpoint; zeroray's own init already ran in __init__

    def get_input_embeddings(self):
        return self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else self.model.embed

    def forward(self, **batch):
        return self.model(**batch)


class ZerorayForMaskedLM(ZerorayPreTrainedModel):
    """Labels as zeroray's mlm objective: the original token at masked positions, −100 elsewhere."""


class ZerorayForSeq2SeqLM(ZerorayPreTrainedModel):
    """input_ids / attention_mask for the encoder, decoder_input_ids and labels for the decoder."""


class ZerorayForCausalLM(ZerorayPreTrainedModel):
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutput:
        """Labels follow `transformers`' convention: the same as input_ids, shifted inside."""
        out = self.model(input_ids)
        loss = None
        if labels is not None:
            logits = out.logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        return CausalLMOutput(loss=loss, logits=out.logits)


WRAPPERS = {"causal": (ZerorayForCausalLM, AutoModelForCausalLM),
            "mlm": (ZerorayForMaskedLM, AutoModelForMaskedLM),
            "span_corruption": (ZerorayForSeq2SeqLM, AutoModelForSeq2SeqLM)}


def wrapper_for(model_name: str) -> tuple[type[ZerorayPreTrainedModel], type]:
    """The wrapper class and the Auto factory for a model family (by its first objective)."""
    return WRAPPERS[models.entry(model_name).config_cls.objectives[0]]


AutoConfig.register("zeroray", ZerorayConfig)
AutoModel.register(ZerorayConfig, ZerorayPreTrainedModel)
for _cls, _auto in WRAPPERS.values():
    _auto.register(ZerorayConfig, _cls)
