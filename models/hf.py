"""`transformers` wrappers, so an exported zeroray model opens with AutoConfig / AutoModelForCausalLM.

The wrapped module is the very class zeroray trains (no re-implementation that could drift); the
config carries zeroray's model section. Importing this module registers the classes with the Auto
factories; an exported folder also names them in `auto_map` for `trust_remote_code=True` loading.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

import models


class ZerorayConfig(PretrainedConfig):
    model_type = "zeroray"

    def __init__(self, zeroray_model: dict | None = None, **kwargs):
        self.zeroray_model = dict(zeroray_model or {})
        kwargs.setdefault("tie_word_embeddings", bool(self.zeroray_model.get("tie_embeddings", False)))
        if "vocab_size" in self.zeroray_model:
            kwargs.setdefault("vocab_size", self.zeroray_model["vocab_size"])
        super().__init__(**kwargs)


class ZerorayForCausalLM(PreTrainedModel):
    config_class = ZerorayConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: ZerorayConfig):
        super().__init__(config)
        entry = models.entry(config.zeroray_model["name"])
        self.model = models.build(entry.config_cls.model_validate(config.zeroray_model))
        self.post_init()

    def _init_weights(self, module) -> None:
        pass  # weights come from the checkpoint; zeroray's own init already ran in __init__

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutput:
        """Labels follow `transformers`' convention: the same as input_ids, shifted inside."""
        out = self.model(input_ids)
        loss = None
        if labels is not None:
            logits = out.logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=out.logits)


AutoConfig.register("zeroray", ZerorayConfig)
AutoModelForCausalLM.register(ZerorayConfig, ZerorayForCausalLM)
