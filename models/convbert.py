"""ConvBERT (Jiang et al., "ConvBERT: Improving BERT with Span-based Dynamic Convolution", NeurIPS 2020)
and its BERT baseline, pre-trained with ELECTRA's replaced-token detection (or plain BERT MLM).

The networks are `transformers`' own classes, built from config objects (nothing is downloaded):
- `convbert`: `ConvBertModel` / `ConvBertForMaskedLM`. Each layer's mixed attention gives
  n_heads/head_ratio heads to self-attention and as many to span-based dynamic convolution (the
  span-aware key is a depthwise-separable convolution of the input; the kernel, one per head and
  position, is softmax(W_f (K_s ⊙ Q)) over `conv_kernel_size` taps); the FFN is a grouped linear
  when `num_groups` > 1. Paper setting: head_ratio 2, kernel 9, groups 2 for medium-small, 1 otherwise.
- `bert`: the same recipe with BERT's encoder, via `transformers`' ELECTRA classes (`ElectraModel`
  is `BertModel` without the pooler plus ELECTRA's embedding projection when embedding_size ≠ d_model;
  `ElectraForMaskedLM` has the MLM head ConvBERT's is copied from). So the two families differ only
  in their encoder layers: embeddings, heads, generator recipe and initialisation are the same.

Where `transformers` is not faithful to the paper's code, or not fit for pre-training, it is fixed here:
1. `pad_token_id`: ConvBertConfig defaults to 1 (ElectraConfig to 0), and the word embedding takes it
   as `padding_idx`: that row is zeroed and gets no gradient through the lookup. Ids 0/1 are real
   bytes / BPE tokens here, so the pad id is zeroray's own (vocab_size − 2, see the mlm objective),
   which packed batches never contain.
2. Padding leaked into the convolution branch: `transformers` (and the original TF code) mask only
   the attention scores, so the span-aware key's depthwise convolution and the dynamic convolution
   read the hidden states of padded positions next to real ones. `PaddingAwareMixedAttention` zeroes
   padded positions before both, which makes a padded sequence give the same outputs at its real
   positions as the unpadded one (packed batches have no padding; callers with `attention_mask` do).
3. The depthwise convolution is initialised with std 1/kernel as in the paper's code
   (`create_initializer(1/conv_kernel_size)`), not `initializer_range` (0.02), which starts every
   dynamic kernel near-uniform.
4. Attention scores/values run through `F.scaled_dot_product_attention` (same maths as the explicit
   matmul + softmax; fused kernels on GPU), the attention probabilities are not returned.
Checked and kept: the grouped linear's weights get N(0, init_std) through `post_init` (they start as
`torch.empty`, and would stay garbage if the layer were built outside a `PreTrainedModel`).
Deviation kept, documented: for any head_ratio `transformers` splits d_model evenly between attention
and convolution (heads of d_model·head_ratio/(2·n_heads)); the paper's code keeps heads of
d_model/n_heads and projects a 2·d_model/head_ratio concatenation. The two agree at head_ratio 2
with n_heads ≥ 2, i.e. every paper configuration except a one-head generator (ConvBERT-small's).

Replaced-token detection (ELECTRA, as ConvBERT is pre-trained): a generator — the same family,
width/heads/FFN scaled by `generator_size`, same depth, sharing the discriminator's embedding module
(word, position and type embeddings and their LayerNorm, as ELECTRA's shared `electra/embeddings`
scope) — predicts the selected tokens of the MLM-masked input; replacements are sampled from its
softmax (no gradient, global RNG so seeded and resumed runs draw the same); the discriminator reads
the original sequence with the samples at the selected positions and predicts, per position, whether
the token was replaced (a sample equal to the original counts as original).
loss = generator MLM loss + rtd_weight · BCE, reported as aux "generator_mlm" + the objective.
Free of any parallelism: DeepSpeed wraps it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ConvBertConfig as HFConvBertConfig
from transformers import (
    ConvBertForMaskedLM,
    ConvBertModel,
    ElectraConfig,
    ElectraForMaskedLM,
    ElectraModel,
    PreTrainedModel,
)
from transformers.models.convbert.modeling_convbert import (
    ConvBertAttention,
    ConvBertSelfAttention,
    GroupedLinearLayer,
)
from transformers.models.electra.modeling_electra import ElectraDiscriminatorPredictions, ElectraSelfAttention

from models.convbert_config import BertConfig, ConvBertConfig, EncoderPretrainingConfig  # noqa: F401 (re-exported)
from models.family import IGNORE_INDEX, ModelFamily
from models.output import ModelOutput
from models.parameters import decay_param_groups


class PaddingAwareMixedAttention(ConvBertSelfAttention):
    """`transformers`' ConvBERT mixed attention (same parameters, same state-dict keys) with padded
    positions zeroed before the span-aware key's convolution and the dynamic convolution, and SDPA
    for the attention heads. Self-attention only (ConvBERT has no cross-attention)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
        if encoder_hidden_states is not None:
            raise NotImplementedError("span-based dynamic convolution is self-attention only")
        b, t, _ = hidden_states.shape
        k, heads, size = self.conv_kernel_size, self.num_attention_heads, self.attention_head_size
        keep = None
        if attention_mask is not None:
            keep = kept_positions(attention_mask, t).unsqueeze(-1).to(hidden_states.dtype)  # [b, t, 1]
        # Zeroed padding looks to the 'same'-padded convolutions like the zeros past a sequence's end.
        conv_input = hidden_states if keep is None else hidden_states * keep
        span_key = self.key_conv_attn_layer(conv_input.transpose(1, 2)).transpose(1, 2)  # K_s
        query = self.query(hidden_states)
        # One kernel per position and convolution head: softmax over the k taps of W_f (K_s ⊙ Q).
        kernel = self.conv_kernel_layer(span_key * query).reshape(-1, k, 1).softmax(dim=1)
        conv_value = self.conv_out_layer(hidden_states)
        if keep is not None:
            conv_value = conv_value * keep
        # As transformers computes it: unfold the k-token windows, then one matmul per (position, head).
        windows = F.unfold(conv_value.transpose(1, 2).unsqueeze(-1), kernel_size=[k, 1], padding=[(k - 1) // 2, 0])
        windows = windows.transpose(1, 2).reshape(-1, size, k)  # [b·t·heads, size, k]
        conv_out = torch.matmul(windows, kernel).view(b, t, heads, size)

        q = query.view(b, t, heads, size).transpose(1, 2)
        key = self.key(hidden_states).view(b, t, heads, size).transpose(1, 2)
        value = self.value(hidden_states).view(b, t, heads, size).transpose(1, 2)
        context = F.scaled_dot_product_attention(
            q, key, value, attn_mask=attention_mask, dropout_p=self.dropout.p if self.training else 0.0
        ).transpose(1, 2)
        return torch.cat([context, conv_out], dim=2).reshape(b, t, 2 * heads * size), None


def kept_positions(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Real (not padded) positions [b, t] from the 4-D mask transformers builds, additive (0 = keep)
    or boolean (True = keep), [b, 1, t or 1, t]: position i's own entry, query i × key i."""
    own = attention_mask[:, 0].expand(-1, length, length).diagonal(dim1=-2, dim2=-1)
    return own if own.dtype == torch.bool else own == 0


def make_padding_aware(model: PreTrainedModel) -> PreTrainedModel:
    """Swap every ConvBERT mixed attention for `PaddingAwareMixedAttention`, keeping its weights,
    and give the depthwise convolution the paper code's initialisation (std 1/kernel)."""
    for attention in [m for m in model.modules() if isinstance(m, ConvBertAttention)]:
        fixed = PaddingAwareMixedAttention(model.config)
        fixed.load_state_dict(attention.self.state_dict())
        nn.init.normal_(fixed.key_conv_attn_layer.depthwise.weight, std=1.0 / model.config.conv_kernel_size)
        attention.self = fixed
    return model


def sample_replacements(logits: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(logits), by the Gumbel-max trick as ELECTRA samples; draws from
    the global RNG, which the trainer seeds and checkpoints, so a resumed run draws the same tokens."""
    with torch.no_grad():
        gumbel = -torch.log(-torch.log(torch.rand_like(logits, dtype=torch.float32)))
        return (logits.float() + gumbel).argmax(dim=-1)


def corrupt(original: torch.Tensor, selected: torch.Tensor, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The discriminator's input — `original` with `samples` (in row-major order) at the selected
    positions — and its target: replaced = differs from the original (a sample equal to the original
    token is original)."""
    corrupted = original.masked_scatter(selected, samples)
    return corrupted, corrupted != original


class EncoderPretraining(ModelFamily):
    """MLM or replaced-token detection around a `transformers` encoder; subclasses pick the family.

    Parameters: mlm → `mlm` (a *ForMaskedLM). rtd → `discriminator` (the encoder kept for fine-tuning),
    `discriminator_head` (ELECTRA's dense–GELU–dense), `generator` (a *ForMaskedLM whose embeddings
    module *is* the discriminator's: ZeRO-3 gathers it at each of its two calls).
    """

    def __init__(self, cfg: EncoderPretrainingConfig):
        super().__init__(cfg)
        if cfg.pretraining == "mlm":
            self.mlm = self.masked_lm(cfg.hf_config())
            return
        hf = cfg.hf_config()
        self.discriminator = self.encoder(hf)
        self.discriminator_head = ElectraDiscriminatorPredictions(hf)
        for linear in (self.discriminator_head.dense, self.discriminator_head.dense_prediction):
            nn.init.normal_(linear.weight, std=cfg.init_std)
            nn.init.zeros_(linear.bias)
        self.generator = self.masked_lm(cfg.hf_config(generator=True))
        shared = self.discriminator.embeddings
        self.generator.base_model.embeddings = shared
        self.generator.get_output_embeddings().weight = shared.word_embeddings.weight  # tied MLM decoder

    # Family hooks: the encoder alone, and the encoder with transformers' MLM head (tied decoder).
    @staticmethod
    def encoder(hf_config) -> PreTrainedModel:
        raise NotImplementedError

    @staticmethod
    def masked_lm(hf_config) -> PreTrainedModel:
        raise NotImplementedError

    def enable_activation_checkpointing(self) -> None:
        for model in self.children():
            if isinstance(model, PreTrainedModel):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> ModelOutput:
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds model.max_seq_len {self.config.max_seq_len}")
        if self.config.pretraining == "mlm":
            logits = self.mlm(input_ids, attention_mask=attention_mask).logits
            return ModelOutput(loss=self.loss(logits, labels), logits=logits)
        if labels is None:  # inference: which tokens of input_ids look replaced
            return ModelOutput(logits=self.discriminate(input_ids, attention_mask))

        selected = labels != IGNORE_INDEX
        generator_logits = self.generator(input_ids, attention_mask=attention_mask).logits[selected].float()
        generator_loss = F.cross_entropy(generator_logits, labels[selected])
        original = torch.where(selected, labels, input_ids)
        corrupted, replaced = corrupt(original, selected, sample_replacements(generator_logits.detach()))
        logits = self.discriminate(corrupted, attention_mask)
        # BCE (fp32) averaged over the real positions, all of them in a packed batch.
        weight = torch.ones_like(logits, dtype=torch.float32) if attention_mask is None else attention_mask.float()
        bce = F.binary_cross_entropy_with_logits(logits.float(), replaced.float(), reduction="none")
        rtd_loss = self.config.rtd_weight * (bce * weight).sum() / weight.sum()
        self._statistics = {
            "rtd/replaced_fraction": replaced[selected].float().mean().detach(),
            "rtd/disc_accuracy_fraction": (((logits > 0) == replaced).float() * weight).sum().detach() / weight.sum(),
        }
        return ModelOutput(loss=generator_loss + rtd_loss, logits=logits, aux_losses={"generator_mlm": generator_loss})

    def discriminate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Replaced-token logits [b, t] (positive = replaced)."""
        hidden = self.discriminator(input_ids, attention_mask=attention_mask).last_hidden_state
        return self.discriminator_head(hidden)

    def tied_parameters(self) -> dict[str, str]:
        """Each shared parameter's later name → its first name (generator embeddings → the
        discriminator's; MLM decoder → the word embeddings)."""
        first: dict[int, str] = {}
        tied: dict[str, str] = {}
        for name, p in self.named_parameters(remove_duplicate=False):
            if id(p) in first:
                tied[name] = first[id(p)]
            else:
                first[id(p)] = name
        return tied

    # ---- accounting (rtd's statistics: the replaced share of the selected positions and the
    # discriminator's accuracy over all positions, ELECTRA's disc_accuracy) ----------------------
    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 × multiply-adds, generator included under rtd.

        Per token, every Linear / Conv1d / grouped-linear weight is one multiply-add per element (the
        tied MLM decoder too: it is a matmul; embedding lookups are not): for ConvBERT that covers
        q/k/v, the span-aware key's depthwise (C·k) and pointwise convolutions, the kernel generator
        W_f, the convolution's value projection and the grouped FFN. Plus, per layer, the dynamic
        convolution as transformers computes it (unfold, then a [size × k]·[k × 1] matmul per head:
        conv_dims·k) and the attention heads' QKᵀ and AV (2·seq·attention_dims; ConvBERT's attention
        has half of BERT's dims).
        """
        macs = 0
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv1d | GroupedLinearLayer):
                macs += m.weight.numel()
            if isinstance(m, ConvBertSelfAttention):
                macs += m.all_head_size * m.conv_kernel_size
            if isinstance(m, ConvBertSelfAttention | ElectraSelfAttention):
                macs += 2 * seq_len * m.all_head_size
        return 6.0 * macs

    def param_groups(self, weight_decay: float) -> list[dict]:
        """BERT/ELECTRA's rule: decay weight matrices and embeddings, never LayerNorm or biases (by
        name: the separable convolution's bias is [C, 1])."""
        return decay_param_groups(self, weight_decay, lambda name, p: p.dim() >= 2 and not name.endswith("bias"))


class ConvBertPretraining(EncoderPretraining):
    @staticmethod
    def encoder(hf_config: HFConvBertConfig) -> PreTrainedModel:
        return make_padding_aware(ConvBertModel(hf_config))

    @staticmethod
    def masked_lm(hf_config: HFConvBertConfig) -> PreTrainedModel:
        return make_padding_aware(ConvBertForMaskedLM(hf_config))


class BertPretraining(EncoderPretraining):
    @staticmethod
    def encoder(hf_config: ElectraConfig) -> PreTrainedModel:
        return ElectraModel(hf_config)

    @staticmethod
    def masked_lm(hf_config: ElectraConfig) -> PreTrainedModel:
        return ElectraForMaskedLM(hf_config)
