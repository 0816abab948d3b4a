"""Charformer (Tay et al., ICLR 2022): a byte-level T5-style encoder–decoder whose encoder learns
its own subwords with GBST and then runs on a sequence d_s times shorter.

Encoder: byte embedding → GBST (models/layers/gbst.py: positional convolution, soft choice among
block sizes 1..M, mean-pool by d_s) → pre-norm bidirectional Transformer blocks over the ⌈L/d_s⌉
latent subwords (RMSNorm, rotary positions, SwiGLU) → final RMSNorm.
Decoder: byte-level and causal over `decoder_input_ids` — GBST looks ahead (its convolution and
blocks mix later bytes in), so it never runs in the decoder. Each block: causal self-attention,
cross-attention to the encoder output (padding masked, no rotary), SwiGLU MLP; an LM head on top.

One byte embedding table serves encoder and decoder, as in T5 (and ByT5/Charformer, built on T5's
code), where both read from the `shared` table: the two sides speak the same byte vocabulary and
the sentinels the encoder reads are the ones the decoder writes. Whether the LM head also shares
it is `tie_embeddings` (T5 1.0 tied, T5 1.1/ByT5 do not; with ~300 byte ids it costs little either way).
Trains on the `span_corruption` objective. Free of any parallelism: DeepSpeed wraps it.

`gbst: false` is the paper's byte-level baseline (ByT5-style): the same encoder–decoder with the
bytes going straight into the encoder blocks, one position per byte.
"""

from __future__ import annotations

import math
from functools import partial
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from models.family import FamilyConfig, ModelFamily
from models.layers.attention import Attention, KVCache
from models.layers.gbst import GBST
from models.layers.mlp import SwiGLU, swiglu_hidden_size
from models.layers.norms import RMSNorm
from models.output import ModelOutput
from models.parameters import init_normal
from models.registry import register


class CharformerConfig(FamilyConfig):
    objectives: ClassVar[tuple[str, ...]] = ("span_corruption",)

    name: Literal["charformer"] = Field("charformer", description="Model family; `zeroray models` lists them.")
    vocab_size: int = Field(
        0, ge=0, description="Byte ids + the objective's pad/mask/sentinel ids; 0 = take it from the data."
    )
    d_model: int = Field(512, ge=8, description="Width of the residual stream (encoder, GBST and decoder).")
    n_heads: int = Field(8, ge=1, description="Attention heads (self- and cross-attention).")
    n_encoder_layers: int = Field(6, ge=1, description="Transformer blocks of the encoder (after GBST).")
    n_decoder_layers: int = Field(6, ge=1, description="Transformer blocks of the byte-level decoder.")
    mlp_multiple_of: int = Field(64, ge=1, description="SwiGLU hidden size (≈ 8/3·d_model) is rounded up to this multiple.")
    max_seq_len: int = Field(
        1024, ge=8, description="Longest encoder input in bytes (before downsampling); also caps the decoder input."
    )
    gbst: bool = Field(
        True,
        description="Learn subwords with GBST and downsample; false = the byte-level encoder–decoder baseline: "
        "bytes go straight into the encoder (downsample must be 1; max_block_size, conv_kernel and "
        "score_calibration are ignored).",
    )
    max_block_size: int = Field(4, ge=1, description="GBST's M: candidate subword blocks of 1..M bytes.")
    downsample: int = Field(
        2, ge=1, description="GBST's d_s: the encoder blocks see ⌈bytes / d_s⌉ positions (1 without GBST)."
    )
    conv_kernel: int | None = Field(
        None, ge=1, description="Width of GBST's positional convolution; default max_block_size."
    )
    score_calibration: bool = Field(
        False, description="GBST's position-wise score calibration P̂ = softmax(PPᵀ)P (costs O(bytes²))."
    )
    rope_theta: float = Field(10000.0, gt=0, description="Rotary base frequency of the self-attention layers.")
    tie_embeddings: bool = Field(False, description="Share the byte embedding with the output projection.")
    init_std: float = Field(0.02, gt=0, description="Std of the normal initialisation.")

    @model_validator(mode="after")
    def _shapes_fit(self) -> CharformerConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head size d_model/n_heads = {self.d_model // self.n_heads} must be even for rotary")
        if not self.gbst and self.downsample != 1:
            raise ValueError(
                f"downsample ({self.downsample}) needs GBST: without it (gbst: false) the encoder reads every "
                f"byte; set downsample to 1, or gbst to true"
            )
        if self.downsample > self.max_seq_len:
            raise ValueError(f"downsample ({self.downsample}) cannot exceed max_seq_len ({self.max_seq_len})")
        return self

    @property
    def mlp_hidden(self) -> int:
        return swiglu_hidden_size(self.d_model, self.mlp_multiple_of)

    @property
    def kv_cache_layers(self) -> int:
        return self.n_decoder_layers  # the decoder's self-attention (`decode(…, cache=…)`)


class EncoderBlock(nn.Module):
    def __init__(self, cfg: CharformerConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, rope_theta=cfg.rope_theta, causal=False)
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), key_padding_mask=mask)
        return x + self.mlp(self.mlp_norm(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: CharformerConfig):
        super().__init__()
        self.self_norm = RMSNorm(cfg.d_model)
        self.self_attn = Attention(cfg.d_model, cfg.n_heads, rope_theta=cfg.rope_theta, causal=True)
        self.cross_norm = RMSNorm(cfg.d_model)
        self.cross_attn = Attention(cfg.d_model, cfg.n_heads, rope_theta=None, causal=False)
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor,
                cache: KVCache | None = None, layer_idx: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.self_norm(x), cache=cache, layer_idx=layer_idx)
        x = x + self.cross_attn(self.cross_norm(x), memory=memory, key_padding_mask=memory_mask)
        return x + self.mlp(self.mlp_norm(x))


class CharformerModel(ModelFamily):
    def __init__(self, cfg: CharformerConfig):
        super().__init__(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)  # encoder and decoder (T5's `shared`)
        self.gbst = (GBST(cfg.d_model, cfg.max_block_size, cfg.downsample, cfg.conv_kernel, cfg.score_calibration)
                     if cfg.gbst else None)
        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_encoder_layers))
        self.encoder_norm = RMSNorm(cfg.d_model)
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_decoder_layers))
        self.decoder_norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(partial(init_normal, std=cfg.init_std))
        # GPT-2 / OLMo: projections that write into a residual stream get std / sqrt(writes into that
        # stream): 2 per encoder block (attention, MLP), 3 per decoder block (+ cross-attention).
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                writes = 2 * cfg.n_encoder_layers if name.startswith("encoder.") else 3 * cfg.n_decoder_layers
                nn.init.normal_(p, std=cfg.init_std / math.sqrt(writes))


    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bytes [batch, L] → (encoder output [batch, ⌈L/d_s⌉, d], its mask [batch, ⌈L/d_s⌉] bool)."""
        if self.gbst is not None:
            x, mask, _ = self.gbst(self.embed(input_ids), attention_mask)
        else:
            x = self.embed(input_ids)
            mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                    else attention_mask.bool())
        for block in self.encoder:
            x = block(x, mask)
        return self.encoder_norm(x), mask

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor,
               cache: KVCache | None = None) -> torch.Tensor:
        """Decoder bytes [batch, T] attending to the encoder output → logits [batch, T, vocab].
        `cache`: the decoder's self-attention keys and values of the bytes before these (decoding);
        cross-attention projects the encoder output again at each call (one matmul per layer over the
        ⌈L/d_s⌉ encoder positions, small beside what the cache saves)."""
        x = self.embed(decoder_input_ids)
        for i, block in enumerate(self.decoder):
            x = block(x, memory, memory_mask, cache, i)
        return self.lm_head(self.decoder_norm(x))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                decoder_input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        """`attention_mask` [batch, L]: 1 = real byte, 0 = padding (None = no padding)."""
        limit = self.config.max_seq_len
        for key, ids in (("input_ids", input_ids), ("decoder_input_ids", decoder_input_ids)):
            if ids.shape[1] > limit:
                raise ValueError(f"{key} of {ids.shape[1]} tokens exceeds model.max_seq_len {limit}")
        memory, memory_mask = self.encode(input_ids, attention_mask)
        logits = self.decode(decoder_input_ids, memory, memory_mask)
        return ModelOutput(loss=self.loss(logits, labels), logits=logits, aux_losses=None)

    # ---- accounting -------------------------------------------------------------------------
    def tied_parameters(self) -> dict[str, str]:
        return {"lm_head.weight": "embed.weight"} if self.config.tie_embeddings else {}

    def flops_per_token(self, seq_len: int, target_len: int) -> float:
        """Training FLOPs of one example divided by its `seq_len` encoder bytes: 6 × multiply-adds
        + the attention score/value matmuls (12·d per query–key pair, not halved for causality).

        The encoder reads seq_len = L bytes, its blocks see S = ⌈L/d_s⌉ positions; the decoder reads
        target_len = T bytes (the span-corruption objective's target length; `RunSpec.flops_per_token`
        passes it).
        Multiply-adds: GBST's convolution (d·d·k per byte; counted as a matmul, its zero padding
        included) and block scorer (d per block, ⌈L/b⌉ blocks of each size b), with calibration its
        PPᵀ and softmax(PPᵀ)P (2·L²·M); every Linear of an encoder block × S; of a decoder block × T
        except the cross-attention keys/values × S; the LM head × T. Not counted: the embedding
        lookups, and GBST's means and weighted sum (elementwise, O(M·d) per byte, like the norms).
        Attention: encoder S², decoder self T², cross T·S, per layer.
        Without GBST (`gbst: false`) there is no GBST term and S = L.
        """
        cfg = self.config
        d, m = cfg.d_model, cfg.max_block_size
        length = seq_len
        short = -(-length // cfg.downsample)

        def weights(module: nn.Module) -> int:
            return sum(x.weight.numel() for x in module.modules() if isinstance(x, nn.Linear))

        gbst = 0
        if self.gbst is not None:
            gbst = length * self.gbst.conv.weight.numel() + d * sum(-(-length // b) for b in range(1, m + 1))
            if cfg.score_calibration:
                gbst += 2 * length * length * m
        encoder = short * sum(weights(block) for block in self.encoder)
        decoder = 0
        for block in self.decoder:
            memory_side = weights(block.cross_attn.k_proj) + weights(block.cross_attn.v_proj)
            decoder += target_len * (weights(block) - memory_side) + short * memory_side
        head = target_len * self.lm_head.weight.numel()
        attention = 12 * d * (cfg.n_encoder_layers * short * short
                              + cfg.n_decoder_layers * (target_len * target_len + target_len * short))
        return (6.0 * (gbst + encoder + decoder + head) + attention) / length


register("charformer", CharformerConfig, CharformerModel,
         "Charformer: byte-level encoder–decoder, GBST learns subwords and downsamples the encoder (span corruption)")
