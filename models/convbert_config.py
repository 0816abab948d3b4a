"""The configs of `convbert` and `bert` (models/convbert.py), apart from the networks.

Why a module of their own: the networks are `transformers`' classes, and importing `transformers`
costs seconds in every process (driver, each worker, every CLI call). Validating a spec needs only
these configs; the networks are imported when a convbert or bert model is built (the registry
resolves "models.convbert:…" on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from models.family import FamilyConfig
from models.registry import register

if TYPE_CHECKING:
    from transformers import ConvBertConfig as HFConvBertConfig
    from transformers import ElectraConfig


class EncoderPretrainingConfig(FamilyConfig):
    """What ConvBERT and its BERT baseline share: shapes, and how they are pre-trained."""

    objectives: ClassVar[tuple[str, ...]] = ("mlm",)
    supports_activation_checkpointing: ClassVar[bool] = True

    name: str = Field(..., description="Model family; `zeroray models` lists them.")
    vocab_size: int = Field(
        0, ge=0,
        description="Tokens in the vocabulary, the mlm objective's pad and mask ids included (pad = "
                    "vocab_size − 2); 0 = from the tokenizer and the objective.",
    )
    d_model: int = Field(256, ge=8, description="Hidden width of the discriminator (ConvBERT-small 256, base 768).")
    n_layers: int = Field(12, ge=1, description="Encoder layers (the generator has as many).")
    n_heads: int = Field(
        4, ge=1,
        description="Heads of a BERT layer this wide; ConvBERT gives n_heads/head_ratio of them to "
                    "self-attention and as many to span-based dynamic convolution.",
    )
    d_ff: int = Field(0, ge=0, description="Feed-forward hidden size; 0 = 4 × d_model.")
    embedding_size: int = Field(
        0, ge=0, description="Width of the token/position embeddings (ELECTRA-style factorisation); 0 = d_model."
    )
    max_seq_len: int = Field(512, ge=8, description="Longest sequence: the number of learned position embeddings.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on hidden states and attention probabilities.")
    init_std: float = Field(0.02, gt=0, description="Std of the normal initialisation (BERT's initializer_range).")
    pretraining: Literal["rtd", "mlm"] = Field(
        "rtd",
        description="rtd: ELECTRA replaced-token detection, generator + discriminator (how ConvBERT is "
                    "pre-trained); mlm: BERT masked language modelling with this network alone.",
    )
    generator_size: float = Field(
        0.25, gt=0, le=1,
        description="rtd: generator width, heads and FFN as a fraction of the discriminator's, same depth "
                    "(ConvBERT/ELECTRA: 1/4 small and medium-small, 1/3 base).",
    )
    rtd_weight: float = Field(50.0, ge=0, description="rtd: λ, weight of the discriminator's loss (ELECTRA: 50).")

    @property
    def ff_size(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def embedding_dim(self) -> int:
        return self.embedding_size or self.d_model

    @property
    def pad_token_id(self) -> int:
        """The mlm objective appends pad = V and mask = V + 1 to the tokenizer's V ids."""
        return self.vocab_size - 2

    def shape(self, generator: bool = False) -> tuple[int, int, int]:
        """(hidden, heads, FFN) of the discriminator, or of the generator (ELECTRA's rule, as the
        ConvBERT code applies it: every one scaled by generator_size)."""
        if not generator:
            return self.d_model, self.n_heads, self.ff_size
        f = self.generator_size
        return round(self.d_model * f), max(1, round(self.n_heads * f)), round(self.ff_size * f)

    @model_validator(mode="after")
    def _shapes_fit(self) -> EncoderPretrainingConfig:
        if 0 < self.vocab_size < 3:
            raise ValueError(f"vocab_size ({self.vocab_size}) leaves no room for the pad and mask ids")
        for generator in (False, True) if self.pretraining == "rtd" else (False,):
            self._check_shape("generator" if generator else "discriminator", *self.shape(generator))
        return self

    def _check_shape(self, which: str, hidden: int, heads: int, ff: int) -> None:
        if hidden % heads:
            raise ValueError(f"{which}: d_model {hidden} must be divisible by n_heads {heads}")


class ConvBertConfig(EncoderPretrainingConfig):
    name: Literal["convbert"] = Field("convbert", description="Model family; `zeroray models` lists them.")
    head_ratio: int = Field(2, ge=1, description="γ: self-attention heads = n_heads/γ, the rest span-based convolution.")
    conv_kernel_size: int = Field(9, ge=1, description="Taps of the span-based dynamic convolution (odd).")
    num_groups: int = Field(
        1, ge=1, description="Groups of the grouped-linear FFN (paper: 2 for medium-small, 1 for small and base)."
    )

    def _check_shape(self, which: str, hidden: int, heads: int, ff: int) -> None:
        super()._check_shape(which, hidden, heads, ff)
        if self.conv_kernel_size % 2 == 0:
            raise ValueError(f"conv_kernel_size ({self.conv_kernel_size}) must be odd ('same' padding)")
        # transformers' split (ConvBertSelfAttention): max(1, heads // γ) heads each for attention and
        # convolution, of (hidden // those) // 2 dims; the two halves must rebuild `hidden` exactly.
        branch_heads = max(1, heads // self.head_ratio)
        if hidden % (2 * branch_heads):
            raise ValueError(
                f"{which}: d_model {hidden} must split into 2 × {branch_heads} equal heads "
                f"(n_heads {heads} / head_ratio {self.head_ratio} for attention, as many for convolution)"
            )
        if hidden % self.num_groups or ff % self.num_groups:
            raise ValueError(
                f"{which}: num_groups ({self.num_groups}) must divide d_model ({hidden}) and d_ff ({ff})"
            )

    def hf_config(self, generator: bool = False) -> HFConvBertConfig:
        from transformers import ConvBertConfig as HFConvBertConfig

        hidden, heads, ff = self.shape(generator)
        return HFConvBertConfig(
            vocab_size=self.vocab_size, embedding_size=self.embedding_dim, hidden_size=hidden,
            num_hidden_layers=self.n_layers, num_attention_heads=heads, intermediate_size=ff,
            head_ratio=self.head_ratio, conv_kernel_size=self.conv_kernel_size, num_groups=self.num_groups,
            hidden_dropout_prob=self.dropout, attention_probs_dropout_prob=self.dropout,
            max_position_embeddings=self.max_seq_len, initializer_range=self.init_std,
            # Packed windows have no segments: one token type (a learned bias), not an untrained second row.
            type_vocab_size=1, pad_token_id=self.pad_token_id, bos_token_id=None, eos_token_id=None,
        )


class BertConfig(EncoderPretrainingConfig):
    name: Literal["bert"] = Field("bert", description="Model family; `zeroray models` lists them.")

    def hf_config(self, generator: bool = False) -> ElectraConfig:
        from transformers import ElectraConfig

        hidden, heads, ff = self.shape(generator)
        return ElectraConfig(
            vocab_size=self.vocab_size, embedding_size=self.embedding_dim, hidden_size=hidden,
            num_hidden_layers=self.n_layers, num_attention_heads=heads, intermediate_size=ff,
            hidden_dropout_prob=self.dropout, attention_probs_dropout_prob=self.dropout,
            max_position_embeddings=self.max_seq_len, initializer_range=self.init_std,
            type_vocab_size=1, pad_token_id=self.pad_token_id,
        )


register("convbert", ConvBertConfig, "models.convbert:ConvBertPretraining",
         "ConvBERT encoder (mixed attention + span-based dynamic convolution), ELECTRA RTD or MLM")
register("bert", BertConfig, "models.convbert:BertPretraining",
         "BERT encoder (transformers' ELECTRA classes), ELECTRA RTD or MLM: ConvBERT's baseline")
