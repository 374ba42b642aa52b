"""PinFM: a LLaMA-style causal transformer over user activity sequences (PinFM, GPSD).

Each event of a user's history is one token: item + action (+ surface) + time-gap features. The encoder is
pre-norm RMSNorm, rotary positions, SwiGLU, no biases (GPSD), with SDPA attention. Heads: next-item
pretraining with PinFM's next-, multi- and future-token losses, and CTR ranking with the candidate fused early
(appended to the sequence) or late (user embedding + candidate embedding), scored in serving with DCAT.

This file, `configuration_pinfm.py`, `tokenization_pinfm.py`, `losses.py`, `quantization_pinfm.py` and
`pipeline_pinfm.py` are copied into saved model folders for `trust_remote_code`: they import only torch,
transformers and each other.
"""

import copy
import math
import os
from dataclasses import dataclass
from itertools import chain
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    ModelOutput,
    logging,
)

from .configuration_pinfm import PinFMConfig
from .losses import full_softmax_logits, full_softmax_loss, sample_negatives, sampled_softmax_loss
from .quantization_pinfm import QUANTIZATION_TYPES, PinFMQuantizedEmbedding


logger = logging.get_logger(__name__)

# Universal hash h_j(x) = ((a_j * x + b_j) mod p) mod m of the hashed item tables. The a_j are near p, so the
# product wraps modulo p even for small ids (independent tables), and a_j * x stays below 2**63 for ids < 4e9.
_HASH_PRIME = 2_147_483_647  # 2**31 - 1
_HASH_MULTIPLIERS = (
    1_640_531_527, 1_103_515_245, 1_299_709_891, 2_038_074_743, 1_500_450_271, 1_776_614_203, 1_234_567_891, 1_957_312_541
)
_MAX_HASHED_VOCAB = 4_000_000_000

# PEFT has no defaults for a custom model type: LoRA goes on the attention and SwiGLU projections.
PINFM_AUTO_MAP = {
    "AutoConfig": "configuration_pinfm.PinFMConfig",
    "AutoModel": "modeling_pinfm.PinFMModel",
    "AutoModelForPreTraining": "modeling_pinfm.PinFMForPretraining",
    "AutoModelForSequenceClassification": "modeling_pinfm.PinFMForCTR",
}
PINFM_LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class PinFMModelOutput(ModelOutput):
    """
    Output of [`PinFMModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Final-norm hidden state of every event. At padding positions it is finite but meaningless (a padded token
            attends only to itself), and no real event attends to padding.
        user_embedding (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            Hidden state at each user's last valid (non-padding) event; zeros for a row with no valid event (all
            padding), which leaves the other rows' outputs as they are without it.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Input embeddings and the output of every layer, each `(batch_size, sequence_length, hidden_size)`.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            Attention probabilities of every layer, each `(batch_size, num_heads, sequence_length, sequence_length)`.
        key_values (`tuple(tuple(torch.FloatTensor))`, *optional*, returned with `return_key_values=True`):
            Each layer's rotated keys and values, each `(batch_size, num_heads, sequence_length, head_dim)`: the cache
            that DCAT candidate tokens attend to. Not named `past_key_values`: transformers >= 5.24 renames that
            keyword of every `ModelOutput` to `cache`.
    """

    last_hidden_state: Optional[torch.FloatTensor] = None
    user_embedding: Optional[torch.FloatTensor] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[tuple[torch.FloatTensor, ...]] = None
    key_values: Optional[tuple[tuple[torch.FloatTensor, torch.FloatTensor], ...]] = None


@dataclass
class PinFMForPretrainingOutput(ModelOutput):
    """
    Output of [`PinFMForPretraining`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
            Weighted sum of the enabled losses.
        next_token_loss, multi_token_loss, future_token_loss (`torch.FloatTensor` of shape `()`, *optional*):
            The individual losses (unweighted), when `labels` is given and their weight is positive.
        query_embeddings (`torch.FloatTensor` of shape `(batch_size, sequence_length, projection_size)`):
            L2-normalised scoring projections of every position; score items with [`~PinFMForPretraining.score_items`].
            Finite but meaningless at padding positions (so also everywhere in an all-padding row).
        user_embedding (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            Hidden state at each user's last valid event; zeros for an all-padding row (see [`PinFMModelOutput`]).
        last_hidden_state, hidden_states, attentions: as in [`PinFMModelOutput`].
    """

    loss: Optional[torch.FloatTensor] = None
    next_token_loss: Optional[torch.FloatTensor] = None
    multi_token_loss: Optional[torch.FloatTensor] = None
    future_token_loss: Optional[torch.FloatTensor] = None
    query_embeddings: Optional[torch.FloatTensor] = None
    user_embedding: Optional[torch.FloatTensor] = None
    last_hidden_state: Optional[torch.FloatTensor] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[tuple[torch.FloatTensor, ...]] = None


# Adapted from transformers.models.llama.modeling_llama.LlamaRMSNorm
@dataclass
class PinFMForCTROutput(ModelOutput):
    """
    Output of [`PinFMForCTR`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
            `ctr_loss + config.ctr_aux_loss_weight * aux_loss`.
        logits (`torch.FloatTensor` of shape `(batch_size,)`):
            Click (or conversion) logit of each candidate; `sigmoid(logits)` is the predicted probability.
        ctr_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Binary cross-entropy of `logits` against `labels`.
        aux_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Weighted pretraining losses on the history events (when `config.ctr_aux_loss_weight > 0`).
        candidate_hidden_state (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            Encoder output at the candidate token (early fusion reads it).
        user_embedding (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            Encoder output at the last history event (late fusion reads it; zeros for an empty history).
    """

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    ctr_loss: Optional[torch.FloatTensor] = None
    aux_loss: Optional[torch.FloatTensor] = None
    candidate_hidden_state: Optional[torch.FloatTensor] = None
    user_embedding: Optional[torch.FloatTensor] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[tuple[torch.FloatTensor, ...]] = None


class PinFMRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rotary_cos_sin(
    position_ids: torch.LongTensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary cos/sin for each position, computed on the fly: no buffer that `from_pretrained` could leave unset."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # (B, 1, T, D)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def log_time_buckets(gaps: torch.Tensor, num_buckets: int) -> torch.LongTensor:
    """Bucket non-negative time gaps (seconds) on a half-octave log scale: bucket b ~ 2**(b / 2) seconds."""
    gaps = gaps.clamp(min=0).float()
    return (2.0 * torch.log2(1.0 + gaps)).long().clamp(max=num_buckets - 1)


def _checking_inputs() -> bool:
    """Data-dependent input checks read a value back from the device: skip them while compiling or tracing."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing())


def check_ids_in_range(ids: torch.Tensor, size: int, name: str, field: str) -> None:
    """Raise `ValueError` unless every id of `ids` is in `[0, size)`: one fused min/max reduction, one read-back."""
    if ids.is_floating_point():
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}.")
    if ids.numel() == 0 or not _checking_inputs():
        return
    low, high = torch.stack(torch.aminmax(ids)).tolist()
    if low < 0 or high >= size:
        bad = low if low < 0 else high
        raise ValueError(f"{name} hold id {bad}, outside the model's table [0, {size}) (`config.{field}`).")


class PinFMAttention(nn.Module):
    """Multi-head causal self-attention with rotary positions, through `scaled_dot_product_attention`."""

    def __init__(self, config: PinFMConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.BoolTensor,
        output_attentions: bool = False,
        return_key_value: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[tuple[torch.Tensor, torch.Tensor]]]:
        q, k, v = self.project(hidden_states, cos, sin)  # (B, H, T, D) each
        dropout = self.dropout if self.training else 0.0
        if output_attentions:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, T)
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            probs = F.dropout(scores.softmax(dim=-1), p=dropout, training=self.training)
            out = probs @ v
        else:
            probs = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout)
        B, T = hidden_states.shape[:2]
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H * D)
        return self.o_proj(out), probs, ((k, v) if return_key_value else None)

    def project(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Queries, keys (both rotated) and values, each `(B, heads, T, head_dim)`."""
        B, T, _ = hidden_states.shape
        q, k, v = (
            proj(hidden_states).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def cross_attention(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        past_valid: torch.BoolTensor,
    ) -> torch.Tensor:
        """
        DCAT crossing step: each of a user's C candidate tokens `(U, C, hidden)` attends to that user's cached history
        keys/values `(U, heads, T, head_dim)` (valid where `past_valid` `(U, T)`) and to itself, never to the other
        candidates: the same result as appending each candidate to the sequence alone, in O(C * T), not O(C * T^2).
        """
        U, C, _ = hidden_states.shape
        q, k, v = self.project(hidden_states, cos, sin)  # (U, H, C, D)
        scale = 1.0 / math.sqrt(self.head_dim)
        history_scores = (q @ past_key.transpose(-2, -1)) * scale  # (U, H, C, T)
        history_scores = history_scores.masked_fill(~past_valid[:, None, None, :], torch.finfo(q.dtype).min)
        self_scores = (q * k).sum(-1, keepdim=True) * scale  # (U, H, C, 1)
        probs = torch.cat([history_scores, self_scores], dim=-1).float().softmax(dim=-1).to(q.dtype)
        probs = F.dropout(probs, p=self.dropout if self.training else 0.0, training=self.training)
        out = probs[..., :-1] @ past_value + probs[..., -1:] * v  # (U, H, C, D)
        return self.o_proj(out.transpose(1, 2).reshape(U, C, -1))


class PinFMMLP(nn.Module):
    """SwiGLU feed-forward block (LLaMA)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PinFMLayer(GradientCheckpointingLayer):
    def __init__(self, config: PinFMConfig):
        super().__init__()
        self.input_layernorm = PinFMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = PinFMAttention(config)
        self.post_attention_layernorm = PinFMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = PinFMMLP(config.hidden_size, config.intermediate_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.BoolTensor,
        output_attentions: bool = False,
        return_key_value: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[tuple[torch.Tensor, torch.Tensor]]]:
        attn_out, probs, key_value = self.self_attn(
            self.input_layernorm(hidden_states), cos, sin, attention_mask, output_attentions, return_key_value
        )
        hidden_states = hidden_states + self.dropout(attn_out)
        hidden_states = hidden_states + self.dropout(self.mlp(self.post_attention_layernorm(hidden_states)))
        return hidden_states, probs, key_value

    def cross_forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_key_value: tuple[torch.Tensor, torch.Tensor],
        past_valid: torch.BoolTensor,
    ) -> torch.Tensor:
        """The layer for DCAT candidate tokens: cross-attention to the cached history instead of self-attention."""
        attn_out = self.self_attn.cross_attention(self.input_layernorm(hidden_states), cos, sin, *past_key_value, past_valid)
        hidden_states = hidden_states + self.dropout(attn_out)
        return hidden_states + self.dropout(self.mlp(self.post_attention_layernorm(hidden_states)))


class PinFMItemEmbedding(nn.Module):
    """
    Item-id embedding: one table, or `k` hashed tables whose lookups are concatenated (PinFM). With
    `config.item_embedding_quantization` the tables are row-wise int8/int4 [`PinFMQuantizedEmbedding`]s (serving).
    """

    def __init__(self, config: PinFMConfig):
        super().__init__()
        self.num_tables = config.num_item_hash_tables
        self.quantization = config.item_embedding_quantization
        self.vocab_size = config.item_vocab_size
        if self.num_tables == 0:
            self.table = self._new_table(config.item_vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        else:
            if self.num_tables > len(_HASH_MULTIPLIERS):
                raise ValueError(f"`num_item_hash_tables` must be <= {len(_HASH_MULTIPLIERS)}, got {self.num_tables}.")
            if config.item_vocab_size > _MAX_HASHED_VOCAB:
                raise ValueError(f"`item_vocab_size` must be <= {_MAX_HASHED_VOCAB} with hashed tables (int64 hashing).")
            self.table_size = config.item_hash_table_size
            width = config.hidden_size // self.num_tables
            self.tables = nn.ModuleList(self._new_table(self.table_size, width) for _ in range(self.num_tables))

    def _new_table(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None) -> nn.Module:
        if self.quantization is None:
            return nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx)
        # Empty: the packed rows come from the checkpoint (the padding row was quantised from zeros, so stays zero).
        return PinFMQuantizedEmbedding(num_embeddings, embedding_dim, self.quantization)

    @torch.no_grad()
    def quantize(self, bits: str) -> None:
        """Replace the float table(s), in place, by row-wise `bits` (`"int8"`/`"int4"`) quantised copies."""
        if self.quantization is not None:
            raise ValueError(f"The item embeddings are already quantised ({self.quantization}).")
        if self.num_tables == 0:
            self.table = PinFMQuantizedEmbedding.from_float(self.table, bits)
        else:
            self.tables = nn.ModuleList(PinFMQuantizedEmbedding.from_float(table, bits) for table in self.tables)
        self.quantization = bits

    def hashed_rows(self, item_ids: torch.LongTensor, table_index: int) -> torch.LongTensor:
        a, b = _HASH_MULTIPLIERS[table_index], 7919 * (table_index + 1)
        return ((item_ids * a + b) % _HASH_PRIME) % self.table_size

    def forward(self, item_ids: torch.LongTensor) -> torch.Tensor:
        # An id past the table would crash the float lookup, read garbage from a quantised one, or hash silently.
        check_ids_in_range(item_ids, self.vocab_size, "Item ids", "item_vocab_size")
        if self.num_tables == 0:
            return self.table(item_ids)
        return torch.cat([table(self.hashed_rows(item_ids, j)) for j, table in enumerate(self.tables)], dim=-1)


class PinFMEventEmbedding(nn.Module):
    """Per-event input: item + action (+ surface) + time-gap embeddings, summed, then a small MLP (PinFM)."""

    def __init__(self, config: PinFMConfig):
        super().__init__()
        self.config = config
        self.item_embeddings = PinFMItemEmbedding(config)
        if config.use_action_embeddings:
            self.action_embeddings = nn.Embedding(config.action_vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        if config.surface_vocab_size > 0:
            self.surface_embeddings = nn.Embedding(config.surface_vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        if config.use_time_features:
            # One extra bucket marks "no previous event" for the first event of a sequence.
            self.gap_to_previous_embeddings = nn.Embedding(config.num_time_buckets + 1, config.hidden_size)
            self.gap_to_next_embeddings = nn.Embedding(config.num_time_buckets, config.hidden_size)
        if config.use_input_mlp:
            self.input_norm = PinFMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.input_mlp = PinFMMLP(config.hidden_size, 2 * config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def time_features(
        self, timestamps: torch.LongTensor, attention_mask: torch.Tensor, end_timestamps: Optional[torch.LongTensor] = None
    ) -> torch.Tensor:
        """
        Bucketed gaps of each event to the previous event and to the *next* one (for the last event: to the request
        time, `end_timestamps`, or else gap 0). Both are causal: position `i` predicts event `i + 1` at the time
        `t[i + 1]`, which is the request time of that prediction; every earlier gap is readable from the tokens. (A gap
        to the sequence end would leak, to every position, how long the user stays after it.)
        """
        valid = attention_mask.bool()
        previous_valid, next_valid = torch.zeros_like(valid), torch.zeros_like(valid)
        previous_valid[:, 1:] = valid[:, :-1]
        next_valid[:, :-1] = valid[:, 1:]
        gap_prev = torch.zeros_like(timestamps)
        gap_prev[:, 1:] = timestamps[:, 1:] - timestamps[:, :-1]
        if _checking_inputs():
            backwards = (gap_prev < 0) & previous_valid & valid  # (B, T): an event older than the one before it
            if backwards.any():
                row, position = (int(i) for i in backwards.nonzero()[0])
                raise ValueError(
                    f"`timestamps` must not decrease within a row (oldest event first): row {row} goes from "
                    f"{int(timestamps[row, position - 1])} to {int(timestamps[row, position])} at position {position}."
                )
        prev_bucket = log_time_buckets(gap_prev, self.config.num_time_buckets)
        prev_bucket = prev_bucket.masked_fill(~previous_valid, self.config.num_time_buckets)
        # The last event is followed by the request: the latest valid timestamp, wherever the padding is, or later.
        end = timestamps.masked_fill(~valid, torch.iinfo(timestamps.dtype).min).amax(dim=1, keepdim=True)  # (B, 1)
        if end_timestamps is not None:
            end = torch.maximum(end, end_timestamps.view(-1, 1))
        next_time = end.expand_as(timestamps).clone()
        next_time[:, :-1] = torch.where(next_valid[:, :-1], timestamps[:, 1:], next_time[:, :-1])
        next_bucket = log_time_buckets(next_time - timestamps, self.config.num_time_buckets)
        return self.gap_to_previous_embeddings(prev_bucket) + self.gap_to_next_embeddings(next_bucket)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        action_ids: Optional[torch.LongTensor] = None,
        surface_ids: Optional[torch.LongTensor] = None,
        timestamps: Optional[torch.LongTensor] = None,
        end_timestamps: Optional[torch.LongTensor] = None,
    ) -> torch.Tensor:
        time_embeddings = None
        if self.config.use_time_features:
            if timestamps is None:
                raise ValueError("`timestamps` are required: this model was configured with `use_time_features=True`.")
            time_embeddings = self.time_features(timestamps, attention_mask, end_timestamps)
        return self.combine(input_ids, action_ids, surface_ids, time_embeddings)

    def combine(
        self,
        input_ids: torch.LongTensor,
        action_ids: Optional[torch.LongTensor],
        surface_ids: Optional[torch.LongTensor],
        time_embeddings: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """Item + action (+ surface) (+ time) embeddings through the input MLP: one event token each."""
        embeddings = self.item_embeddings(input_ids)
        if self.config.use_action_embeddings:
            if action_ids is None:
                raise ValueError("`action_ids` are required: this model was configured with `use_action_embeddings=True`.")
            check_ids_in_range(action_ids, self.config.action_vocab_size, "`action_ids`", "action_vocab_size")
            embeddings = embeddings + self.action_embeddings(action_ids)
        if self.config.surface_vocab_size > 0 and surface_ids is not None:
            check_ids_in_range(surface_ids, self.config.surface_vocab_size, "`surface_ids`", "surface_vocab_size")
            embeddings = embeddings + self.surface_embeddings(surface_ids)
        if time_embeddings is not None:
            embeddings = embeddings + time_embeddings
        if self.config.use_input_mlp:
            embeddings = embeddings + self.input_mlp(self.input_norm(embeddings))
        return self.dropout(embeddings)

    def candidate_time_features(self, gap_to_previous: torch.LongTensor, has_previous: torch.BoolTensor) -> torch.Tensor:
        """Time features of a candidate token: its gap to the user's last event, and gap 0 to the request (its own time)."""
        prev_bucket = log_time_buckets(gap_to_previous, self.config.num_time_buckets)
        prev_bucket = prev_bucket.masked_fill(~has_previous, self.config.num_time_buckets)
        next_bucket = torch.zeros_like(prev_bucket)
        return self.gap_to_previous_embeddings(prev_bucket) + self.gap_to_next_embeddings(next_bucket)


def check_event_inputs(
    input_ids: Optional[torch.Tensor],
    attention_mask: Optional[torch.Tensor] = None,
    action_ids: Optional[torch.Tensor] = None,
    surface_ids: Optional[torch.Tensor] = None,
    timestamps: Optional[torch.Tensor] = None,
    end_timestamps: Optional[torch.Tensor] = None,
) -> None:
    """Shape checks of per-event inputs (no device read-back): `(batch_size, sequence_length)` each, with events."""
    if input_ids is None:
        raise ValueError("`input_ids` are required.")
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must be 2-D (batch_size, sequence_length), got shape {tuple(input_ids.shape)}.")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(
            f"`input_ids` has shape {(B, T)}: a batch needs at least one row and one event (an empty history)."
        )
    for name, value in (("attention_mask", attention_mask), ("action_ids", action_ids), ("surface_ids", surface_ids),
                        ("timestamps", timestamps)):
        if value is not None and value.shape != input_ids.shape:
            raise ValueError(f"`{name}` has shape {tuple(value.shape)}, but `input_ids` has {(B, T)}.")
    if end_timestamps is not None and end_timestamps.numel() != B:
        raise ValueError(f"`end_timestamps` has {end_timestamps.numel()} values for a batch of {B} rows.")


def _all_finite(tensor: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """`torch.isfinite(tensor).all()`, in chunks: a large embedding table needs no table-sized boolean copy."""
    flat = tensor.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _weights_file(pretrained_model_name_or_path, subfolder: Optional[str] = None) -> str:
    """The weights file `from_pretrained` read from a local folder, or the hub repo's usual file name."""
    if pretrained_model_name_or_path is None:
        return "The given state dict"
    folder = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
    for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return os.path.join(folder, SAFE_WEIGHTS_NAME)


class PinFMPreTrainedModel(PreTrainedModel):
    config_class = PinFMConfig
    base_model_prefix = "pinfm"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PinFMLayer"]
    _supports_sdpa = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        # One saved folder serves every auto class: `AutoModel` gives the encoder, the head classes their own model.
        self.config.auto_map = {**PINFM_AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
        # `pipeline(model=folder, trust_remote_code=True)` recommends with the pretraining head (pipeline_pinfm.py is
        # copied as a relative import); encoder and CTR folders do not inherit the entry from their base's config.
        from .pipeline_pinfm import saved_custom_pipelines

        self.config.custom_pipelines = saved_custom_pipelines() if type(self) is PinFMForPretraining else {}
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """
        [`~transformers.PreTrainedModel.from_pretrained`], then a check that every loaded weight is finite: NaN or
        inf weights would make every score NaN, so serving would rank nothing (an empty recommendation list).
        """
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # `output_loading_info=True` adds a dict
        model.check_finite_weights(_weights_file(pretrained_model_name_or_path, kwargs.get("subfolder")))
        return loaded

    @torch.no_grad()
    def check_finite_weights(self, source: str = "The model") -> None:
        """Raise `ValueError` naming `source` and how many float parameters/buffers hold a NaN or an infinity."""
        bad = [
            name
            for name, tensor in chain(self.named_parameters(), self.named_buffers())
            if tensor.is_floating_point() and tensor.device.type != "meta" and not _all_finite(tensor)
        ]
        if bad:
            raise ValueError(
                f"{source} holds {len(bad)} non-finite (NaN/inf) tensor(s), e.g. `{bad[0]}`: the checkpoint is corrupt."
            )

    def train(self, mode: bool = True) -> "PinFMPreTrainedModel":
        # A quantised table refuses training mode: refuse before any module's flag changes, so a caught refusal
        # leaves the whole tree in the mode it was in.
        if mode:
            for module in self.modules():
                if isinstance(module, PinFMQuantizedEmbedding):
                    module.train(True)  # raises
        return super().train(mode)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, PinFMForPretraining):
            init.constant_(module.log_temperature, math.log(self.config.initial_temperature))
            init.zeros_(module.item_log_probs)
        if isinstance(module, PinFMCrossLayer):
            init.zeros_(module.linear.bias)

    def quantize_item_embeddings(self, bits: str) -> "PinFMPreTrainedModel":
        """
        Quantise the trained item embedding table(s) row-wise for serving, in place: `"int8"` (`dim + 8` bytes a row,
        28% of fp32 at `dim=64`) or `"int4"` (`dim / 2 + 4` bytes, 14%), each row with its own scale and bias (FBGEMM
        ops of torch's CPU build). Sets `config.item_embedding_quantization`, so `save_pretrained` writes a folder that
        `from_pretrained` loads quantised. A quantised model cannot be trained: it is returned in eval mode, and
        `train()` raises (fine-tune the unquantised checkpoint instead).

        Example: `model = PinFMForPretraining.from_pretrained(folder).quantize_item_embeddings("int8")`.
        """
        if self.config.item_embedding_quantization is not None:
            raise ValueError(
                f"The item embeddings are already quantised ({self.config.item_embedding_quantization}): load the "
                "unquantised checkpoint to quantise it differently."
            )
        if bits not in QUANTIZATION_TYPES:
            raise ValueError(f"`bits` must be one of {QUANTIZATION_TYPES}, got {bits!r}.")
        for module in self.modules():
            if isinstance(module, PinFMItemEmbedding):
                module.quantize(bits)  # int4 on an odd table width raises here, before any table is replaced
        # A copy: another model built from the same config object keeps its float tables, and must not save as
        # quantised (its folder would then load zeros for the packed tables it does not have).
        shared, config = self.config, copy.deepcopy(self.config)
        config.item_embedding_quantization = bits
        for module in self.modules():
            if getattr(module, "config", None) is shared:
                module.config = config
        return self.eval()


class PinFMModel(PinFMPreTrainedModel):
    """
    The bare PinFM encoder: event embeddings -> causal transformer -> final RMSNorm.

    Padding may be on either side: rotary positions count only real events, so left- and right-padded batches give
    the same outputs at real positions. A row with no real event (all padding, e.g. a user without history in a
    batch) is allowed: its `user_embedding` is zeros, its other outputs are finite and meaningless, and the other
    rows' outputs are those of the batch without it.
    """

    # The encoder loads from head checkpoints (e.g. pretraining): their head weights are expected leftovers.
    _keys_to_ignore_on_load_unexpected = [r"^(query_proj|item_proj)\.", r"^log_temperature$", r"^item_log_probs$"]

    def __init__(self, config: PinFMConfig):
        super().__init__(config)
        self.embeddings = PinFMEventEmbedding(config)
        if config.use_absolute_position_embeddings:
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(PinFMLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = PinFMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.item_embeddings

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        action_ids: Optional[torch.LongTensor] = None,
        surface_ids: Optional[torch.LongTensor] = None,
        timestamps: Optional[torch.LongTensor] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        end_timestamps: Optional[torch.LongTensor] = None,
        return_key_values: bool = False,
        extra_embeddings: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> PinFMModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Item token ids from [`PinFMTokenizer`], oldest event first.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for real events, 0 for padding; defaults to `input_ids != pad_token_id`.
            action_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Action token ids (required when `config.use_action_embeddings`).
            surface_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Surface token ids (used when `config.surface_vocab_size > 0`).
            timestamps (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Event times in unix seconds (required when `config.use_time_features`).
            end_timestamps (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Request time of each sequence, when it is later than its last event (DCAT encodes the history ahead
                of candidates stamped with the request time).
            return_key_values (`bool`, *optional*, defaults to `False`):
                Return each layer's keys and values (`key_values`) for [`PinFMModel.encode_candidates`].
            extra_embeddings (`torch.Tensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                Added to the event embeddings (e.g. a candidate's item side features, for cold start).

        Ids outside their vocabulary (`config.item_vocab_size`, `action_vocab_size`, `surface_vocab_size`) and
        timestamps that decrease within a row raise a `ValueError`, as does an input without events
        (`sequence_length` 0).
        """
        check_event_inputs(input_ids, attention_mask, action_ids, surface_ids, timestamps, end_timestamps)
        output_hidden_states = bool(output_hidden_states)
        output_attentions = bool(output_attentions)
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        valid = attention_mask.bool()  # (B, T)
        B, T = input_ids.shape

        hidden_states = self.embeddings(input_ids, attention_mask, action_ids, surface_ids, timestamps, end_timestamps)
        if extra_embeddings is not None:
            hidden_states = hidden_states + extra_embeddings
        position_ids = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T) real-event positions
        hidden_states = self.add_position_embeddings(hidden_states, position_ids)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, hidden_states.dtype)
        causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
        # Padded queries attend to themselves only, so no softmax row is empty (no NaN).
        mask = (causal & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=input_ids.device)
        mask = mask[:, None]  # (B, 1, T, T)

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        key_values = () if return_key_values else None
        for layer in self.layers:
            hidden_states, probs, key_value = layer(hidden_states, cos, sin, mask, output_attentions, return_key_values)
            if return_key_values:
                key_values += (key_value,)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (probs,)
        hidden_states = self.norm(hidden_states)

        last_index = (valid.long() * torch.arange(T, device=input_ids.device)).argmax(dim=1)  # (B,)
        has_events = valid.any(dim=1, keepdim=True).to(hidden_states.dtype)  # (B, 1): an all-padding row gets zeros
        user_embedding = hidden_states[torch.arange(B, device=input_ids.device), last_index] * has_events  # (B, H)
        return PinFMModelOutput(
            last_hidden_state=hidden_states,
            user_embedding=user_embedding,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            key_values=key_values,
        )

    def add_position_embeddings(self, hidden_states: torch.Tensor, position_ids: torch.LongTensor) -> torch.Tensor:
        """Add the learned absolute position embeddings when configured (positions past the table share its last row)."""
        if not self.config.use_absolute_position_embeddings:
            return hidden_states
        return hidden_states + self.position_embeddings(position_ids.clamp(max=self.config.max_position_embeddings - 1))

    def encode_candidates(
        self,
        candidate_embeddings: torch.Tensor,
        candidate_positions: torch.LongTensor,
        key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...],
        past_valid: torch.BoolTensor,
    ) -> torch.Tensor:
        """
        DCAT crossing pass: run `(U, C, hidden)` candidate tokens (from `embeddings.combine`) through every layer,
        each attending to its user's cached `key_values` (valid where `past_valid` `(U, T)`) and itself, at
        rotary position `candidate_positions` `(U, C)` (the user's number of events). Returns the final-norm outputs.
        """
        cos, sin = rotary_cos_sin(candidate_positions, self.config.head_dim, self.config.rope_theta, candidate_embeddings.dtype)
        hidden_states = self.add_position_embeddings(candidate_embeddings, candidate_positions)
        for layer, layer_key_values in zip(self.layers, key_values):
            hidden_states = layer.cross_forward(hidden_states, cos, sin, layer_key_values, past_valid)
        return self.norm(hidden_states)


class PinFMForPretraining(PinFMPreTrainedModel):
    """
    PinFM encoder with a next-item scoring head, trained with PinFM's next-token, multi-token and future-token
    losses. Scores are dot products of L2-normalised projections of the hidden state and of the item embedding,
    divided by a learnable temperature; negatives come from the batch and from the vocabulary (uniform or by
    popularity, with logQ correction and accidental-hit masking), or the full softmax when `config.full_softmax`.
    """

    def __init__(self, config: PinFMConfig):
        super().__init__(config)
        self.pinfm = PinFMModel(config)
        self.query_proj = nn.Linear(config.hidden_size, config.projection_size, bias=False)
        self.item_proj = nn.Linear(config.hidden_size, config.projection_size, bias=False)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(config.initial_temperature)))
        # Log popularity of every item id (for popularity negatives and logQ); zeros until `set_item_counts`.
        self.register_buffer("item_log_probs", torch.zeros(config.item_vocab_size))
        self.post_init()

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(min=1e-3)

    @torch.no_grad()
    def set_item_counts(self, counts: torch.Tensor) -> None:
        """Set item popularity (`(item_vocab_size,)` event counts) for popularity sampling and logQ correction."""
        if counts.shape != self.item_log_probs.shape:
            raise ValueError(f"`counts` must have shape {tuple(self.item_log_probs.shape)}, got {tuple(counts.shape)}.")
        probs = counts.float().clamp(min=0)
        probs[: self.config.num_special_item_tokens] = 0
        if probs.sum() <= 0:
            raise ValueError("`counts` must count at least one regular item.")
        probs = (probs + 1e-12) / probs.sum()  # smoothed so log is finite for unseen ids
        self.item_log_probs.copy_(probs.log().to(self.item_log_probs.device))

    @property
    def has_item_counts(self) -> bool:
        return bool(self.item_log_probs.any())

    def item_embeddings(self, item_ids: torch.LongTensor) -> torch.Tensor:
        """L2-normalised scoring embeddings of `item_ids` (any shape `(...)` -> `(..., projection_size)`)."""
        return F.normalize(self.item_proj(self.pinfm.embeddings.item_embeddings(item_ids)), dim=-1)

    def score_items(self, query_embeddings: torch.Tensor, item_ids: Optional[torch.LongTensor] = None) -> torch.Tensor:
        """
        Scores (`logits`) of items for each query: `(..., projection_size)` -> `(..., num_items)`. Without `item_ids`
        all ids are scored and special tokens get `-inf`.
        """
        all_items = item_ids is None
        if all_items:
            item_ids = torch.arange(self.config.item_vocab_size, device=query_embeddings.device)
        scores = (query_embeddings / self.temperature) @ self.item_embeddings(item_ids).T  # scale the smaller side
        if all_items:
            scores[..., : self.config.num_special_item_tokens] = float("-inf")
        return scores

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        action_ids: Optional[torch.LongTensor] = None,
        surface_ids: Optional[torch.LongTensor] = None,
        timestamps: Optional[torch.LongTensor] = None,
        end_timestamps: Optional[torch.LongTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> PinFMForPretrainingOutput:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Item ids of the events, aligned with `input_ids` (usually a copy) and `-100` where ignored; the model
                shifts them itself. Positive targets are events whose action is in `config.positive_action_ids`.
            Other inputs: see [`PinFMModel.forward`]. An all-padding row is allowed (no loss term, zero
            `user_embedding`) and leaves the other rows' outputs unchanged.
        """
        if labels is not None and input_ids is not None and labels.shape != input_ids.shape:
            raise ValueError(f"`labels` has shape {tuple(labels.shape)}, but `input_ids` has {tuple(input_ids.shape)}.")
        outputs = self.pinfm(
            input_ids,
            attention_mask=attention_mask,
            action_ids=action_ids,
            surface_ids=surface_ids,
            timestamps=timestamps,
            end_timestamps=end_timestamps,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        query = F.normalize(self.query_proj(outputs.last_hidden_state), dim=-1)  # (B, T, P)
        losses = {}
        if labels is not None:
            losses = self.pretraining_losses(query, labels, action_ids, attention_mask)
        loss = self.weighted_loss(losses) if losses else None
        return PinFMForPretrainingOutput(
            loss=loss,
            next_token_loss=losses.get("next_token"),
            multi_token_loss=losses.get("multi_token"),
            future_token_loss=losses.get("future_token"),
            query_embeddings=query,
            user_embedding=outputs.user_embedding,
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def weighted_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the losses from `pretraining_losses`, each weighted by its config weight."""
        weights = {
            "next_token": self.config.next_token_loss_weight,
            "multi_token": self.config.multi_token_loss_weight,
            "future_token": self.config.future_token_loss_weight,
        }
        return sum(weights[name] * value for name, value in losses.items())

    def positive_targets(self, labels: torch.LongTensor, action_ids: Optional[torch.LongTensor]) -> torch.BoolTensor:
        """`(B, T)` mask of events that are positive targets: labelled, and with a positive action when configured."""
        positive = labels != -100
        if self.config.positive_action_ids:
            if action_ids is None:
                raise ValueError("`action_ids` are required to select positive targets (`config.positive_action_ids`).")
            allowed = torch.tensor(self.config.positive_action_ids, device=labels.device)
            positive &= torch.isin(action_ids, allowed)
        return positive

    def pretraining_losses(
        self,
        query: torch.Tensor,
        labels: torch.LongTensor,
        action_ids: Optional[torch.LongTensor],
        attention_mask: Optional[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        config = self.config
        B, T, _ = query.shape
        if attention_mask is None:
            attention_mask = labels != -100
        valid_query = attention_mask.bool()  # (B, T)
        positive = self.positive_targets(labels, action_ids)  # (B, T)
        targets = labels.clamp(min=0)

        # (query position, target position) pairs of each loss, as flat indices into (B, T).
        pairs = {}
        if config.next_token_loss_weight > 0:
            pairs["next_token"] = self._offset_pairs(valid_query, positive, offsets=range(1, 2))
        if config.multi_token_loss_weight > 0:
            pairs["multi_token"] = self._offset_pairs(valid_query, positive, offsets=range(1, config.multi_token_window + 1))
        if config.future_token_loss_weight > 0:
            # Query only at the ends of consecutive length-L_d windows: the model sees L_d events and predicts the
            # positives among the L' events after them, as when a cached sequence serves later requests.
            window_end = (torch.arange(T, device=query.device) + 1) % config.future_token_input_length == 0
            pairs["future_token"] = self._offset_pairs(
                valid_query & window_end, positive, offsets=range(1, config.multi_token_window + 1)
            )

        flat_query = query.reshape(B * T, -1)  # (B*T, P)
        flat_targets = targets.reshape(B * T)
        if config.full_softmax:
            return self._full_softmax_losses(flat_query, flat_targets, pairs)
        max_pairs = max(int(valid_query.sum()), 1)
        negatives = None
        losses = {}
        for name, (query_index, target_index) in pairs.items():
            if query_index.numel() > max_pairs:
                # Bound the multi-token work to one pair per real position on average (uniform subsample).
                keep = torch.randperm(query_index.numel(), device=query.device)[:max_pairs]
                query_index, target_index = query_index[keep], target_index[keep]
            if query_index.numel() == 0:
                losses[name] = query.sum() * 0.0  # zero-safe: no positive in range, yet gradients still flow
                continue
            row_target = flat_targets[target_index]  # (N,)
            if negatives is None:
                negatives = self._negatives(flat_targets[positive.reshape(-1)])
            neg_ids, neg_log_q = negatives
            per_row = sampled_softmax_loss(
                flat_query[query_index],
                self.item_embeddings(row_target),
                self.item_embeddings(neg_ids),
                temperature=self.temperature,
                pos_ids=row_target,
                neg_ids=neg_ids,
                pos_log_q=self._log_q(row_target) if config.use_log_q_correction else None,
                neg_log_q=neg_log_q if config.use_log_q_correction else None,
            )
            losses[name] = per_row.mean()
        return losses

    def _full_softmax_losses(
        self, flat_query: torch.Tensor, flat_targets: torch.LongTensor, pairs: dict[str, tuple[torch.LongTensor, torch.LongTensor]]
    ) -> dict[str, torch.Tensor]:
        """
        Cross-entropy over every item for each loss's `(query, target)` pairs. A query's logits do not depend on its
        target, so each query position is scored once and its log-partition shared by all its pairs in all losses:
        the multi-token and future-token losses then cost a gather, not another `(N, V)` softmax.
        """
        # Zero-safe: a loss with no positive in range is 0, yet gradients still flow.
        losses = {name: flat_query.sum() * 0.0 for name, (query_index, _) in pairs.items() if query_index.numel() == 0}
        pairs = {name: pair for name, pair in pairs.items() if name not in losses}
        if not pairs:
            return losses
        first = self.config.num_special_item_tokens
        item_emb = self.item_embeddings(torch.arange(first, self.config.item_vocab_size, device=flat_query.device))
        if len(pairs) == 1:  # one loss (next-token only): the fused cross-entropy is the fastest (bench_pretraining_losses.py)
            (name, (query_index, target_index)), = pairs.items()
            per_row = full_softmax_loss(
                flat_query[query_index], item_emb, flat_targets[target_index] - first, temperature=self.temperature
            )
            return {**losses, name: per_row.mean()}
        queries = torch.unique(torch.cat([query_index for query_index, _ in pairs.values()]))  # sorted
        logits = full_softmax_logits(flat_query[queries], item_emb, temperature=self.temperature)
        log_partition = torch.logsumexp(logits, dim=-1)  # (N,)
        for name, (query_index, target_index) in pairs.items():
            # The target's logit as a dot product, not `logits[row, target]`: indexing the (N, V) logits would
            # scatter its gradient into another dense (N, V) tensor in backward.
            target_emb = item_emb[flat_targets[target_index] - first]  # (M, P)
            target_logit = ((flat_query[query_index] / self.temperature) * target_emb).sum(-1).float()
            losses[name] = (log_partition[torch.searchsorted(queries, query_index)] - target_logit).mean()
        return losses

    @staticmethod
    def _offset_pairs(
        valid_query: torch.BoolTensor, positive: torch.BoolTensor, offsets: range
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Flat `(query, target)` index pairs where the target sits `offset` events after a valid query."""
        B, T = positive.shape
        query_index, target_index = [], []
        flat = torch.arange(B * T, device=positive.device).view(B, T)
        for offset in offsets:
            if offset >= T:
                break
            ok = valid_query[:, :-offset] & positive[:, offset:]  # (B, T - offset)
            query_index.append(flat[:, :-offset][ok])
            target_index.append(flat[:, offset:][ok])
        if not query_index:
            empty = torch.zeros(0, dtype=torch.long, device=positive.device)
            return empty, empty
        return torch.cat(query_index), torch.cat(target_index)

    def _log_q(self, item_ids: torch.LongTensor) -> torch.Tensor:
        """Log probability that `item_ids` are drawn as negatives: popularity when known, else uniform."""
        if self.has_item_counts:
            return self.item_log_probs[item_ids]
        num_items = self.config.item_vocab_size - self.config.num_special_item_tokens
        return torch.full(item_ids.shape, -math.log(num_items), device=item_ids.device)

    def _negatives(self, batch_positive_ids: torch.LongTensor) -> tuple[torch.LongTensor, torch.Tensor]:
        """Shared negatives: sampled from the vocabulary, plus the batch's positive items (popularity-distributed)."""
        config = self.config
        device = batch_positive_ids.device
        if config.negative_sampling == "popularity":
            if not self.has_item_counts:
                raise ValueError("`negative_sampling='popularity'` needs item counts: call `model.set_item_counts(...)`.")
            neg_ids, neg_log_q = sample_negatives(config.num_negatives, probs=self.item_log_probs.exp(), device=device)
        else:
            neg_ids, neg_log_q = sample_negatives(
                config.num_negatives, vocab_size=config.item_vocab_size, first_id=config.num_special_item_tokens, device=device
            )
        if config.use_in_batch_negatives and batch_positive_ids.numel() > 0:
            in_batch = batch_positive_ids.unique()
            # At most `num_negatives` of them: every unique item of a large batch costs as much as a full softmax.
            in_batch = in_batch[torch.randperm(in_batch.numel(), device=device)[: config.num_negatives]]
            neg_ids = torch.cat([neg_ids, in_batch])
            neg_log_q = torch.cat([neg_log_q, self._log_q(in_batch)])
        return neg_ids, neg_log_q


class PinFMCrossLayer(nn.Module):
    """DCN-v2 cross layer: `x_{l+1} = x_0 * (W x_l + b) + x_l`, explicit feature crosses of bounded degree."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class PinFMRankingHead(nn.Module):
    """Ranking head: optional DCN cross layers, then an MLP to one logit."""

    def __init__(self, config: PinFMConfig, input_size: int):
        super().__init__()
        num_cross = config.ctr_num_cross_layers if config.ctr_head == "dcn" else 0
        self.cross_layers = nn.ModuleList(PinFMCrossLayer(input_size) for _ in range(num_cross))
        layers, width = [], input_size
        for hidden in config.ctr_head_hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(config.ctr_dropout)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features
        for layer in self.cross_layers:
            x = layer(features, x)
        return self.mlp(x).squeeze(-1)


class PinFMSideFeatureEmbedding(nn.Module):
    """Embeds side-feature slots and mean-pools each field's slots (multi-valued fields, e.g. genres)."""

    def __init__(self, config: PinFMConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.ctr_feature_vocab_size, config.ctr_feature_embedding_size, padding_idx=0)
        self.slots = list(config.ctr_feature_slots)
        self.num_fields = len(self.slots)

    @property
    def output_size(self) -> int:
        return self.num_fields * self.embeddings.embedding_dim

    def forward(self, side_feature_ids: torch.LongTensor) -> torch.Tensor:
        if side_feature_ids.shape[-1] != sum(self.slots):
            raise ValueError(
                f"`side_feature_ids` has {side_feature_ids.shape[-1]} slot columns, the config expects "
                f"{sum(self.slots)} (`ctr_feature_slots` = {self.slots})."
            )
        # Field of every slot column, built here rather than kept as a buffer (no meta-device init trouble).
        slots = torch.tensor(self.slots, device=side_feature_ids.device)
        field_of_slot = torch.repeat_interleave(torch.arange(self.num_fields, device=slots.device), slots)  # (S,)
        used = (side_feature_ids != 0).to(self.embeddings.weight.dtype)  # (B, S)
        one_hot = F.one_hot(field_of_slot, self.num_fields).to(used.dtype)  # (S, F)
        weights = used.unsqueeze(-1) * one_hot  # (B, S, F)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1.0)  # mean over the used slots of a field
        pooled = torch.einsum("bsf,bsd->bfd", weights, self.embeddings(side_feature_ids))  # (B, F, D)
        return pooled.flatten(1)


class PinFMForCTR(PinFMForPretraining):
    """
    PinFM with a ranking head for CTR/CVR, fine-tuned from a pretrained checkpoint.

    The candidate is the last token of each sequence (candidate action marker, impression time). Early fusion scores
    the candidate's output position, where the candidate has attended to the whole history (PinFM, GPSD). Late
    fusion combines the output at the last history event (which, the encoder being causal, has not seen the
    candidate) with the candidate's item embedding; both come from one encoder pass. Side features (user and item
    fields) join in the ranking head. It subclasses the pretraining model so a pretrained checkpoint loads as is and
    its next-token loss stays available as an auxiliary loss (`config.ctr_aux_loss_weight`).

    [`PinFMForCTR.score_candidates`] scores many candidates per user with DCAT (PinFM's deduplicated
    cross-attention): each distinct user sequence is encoded once, and candidates attend to its cached keys/values.
    """

    def __init__(self, config: PinFMConfig):
        super().__init__(config)
        self.ctr_feature_embeddings = PinFMSideFeatureEmbedding(config) if config.ctr_feature_vocab_size else None
        head_input = config.hidden_size if config.ctr_fusion == "early" else 3 * config.hidden_size
        if self.ctr_feature_embeddings is not None:
            head_input += self.ctr_feature_embeddings.output_size
        self.ctr_head = PinFMRankingHead(config, head_input)
        self.ctr_candidate_feature_proj = None
        if config.ctr_candidate_item_features:
            width = len(config.ctr_item_feature_fields) * config.ctr_feature_embedding_size
            self.ctr_candidate_feature_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.post_init()

    def candidate_feature_embeddings(self, side_feature_ids: Optional[torch.LongTensor]) -> Optional[torch.Tensor]:
        """Cold start: the candidate's item side features, projected to one token embedding `(N, hidden)`."""
        if self.ctr_candidate_feature_proj is None:
            return None
        if side_feature_ids is None:
            raise ValueError("`side_feature_ids` are required: `ctr_candidate_item_features` feeds them to the candidate.")
        pooled = self.ctr_feature_embeddings(side_feature_ids).view(side_feature_ids.shape[0], -1, self.config.ctr_feature_embedding_size)
        return self.ctr_candidate_feature_proj(pooled[:, self.config.ctr_item_feature_fields].flatten(1))

    def young_item_mask(self, candidate_age: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
        """
        Cold start (PinFM): in training, a `(N, 1)` multiplier that drops the sequence output for young candidate
        items, with probability `ctr_young_item_dropout * (1 - age / ctr_young_item_age_days)` (scaled like dropout).
        """
        rate = self.config.ctr_young_item_dropout
        if not self.training or rate == 0 or candidate_age is None:
            return None
        age_days = candidate_age.to(like.dtype).clamp(min=0) / 86400.0
        drop = rate * (1.0 - age_days / self.config.ctr_young_item_age_days).clamp(min=0.0)  # (N,)
        keep = torch.bernoulli(1.0 - drop) / (1.0 - drop)
        return keep.view(-1, 1)

    def ranking_logits(
        self,
        candidate_hidden: torch.Tensor,
        user_embedding: torch.Tensor,
        candidate_ids: torch.LongTensor,
        side_feature_ids: Optional[torch.LongTensor],
        candidate_age: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Head logits `(N,)` from the candidate's encoder output (early fusion) or user + candidate (late fusion)."""
        keep = self.young_item_mask(candidate_age, candidate_hidden)
        if keep is not None:  # the sequence model's output, dropped for young items in training
            candidate_hidden, user_embedding = candidate_hidden * keep, user_embedding * keep
        if self.config.ctr_fusion == "early":
            parts = [candidate_hidden]
        else:
            candidate_embedding = self.pinfm.embeddings.item_embeddings(candidate_ids)  # (N, H)
            parts = [user_embedding, candidate_embedding, user_embedding * candidate_embedding]
        if self.ctr_feature_embeddings is not None:
            if side_feature_ids is None:
                raise ValueError("`side_feature_ids` are required: this model was configured with side features.")
            parts.append(self.ctr_feature_embeddings(side_feature_ids))
        return self.ctr_head(torch.cat(parts, dim=-1)).float()

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        action_ids: Optional[torch.LongTensor] = None,
        surface_ids: Optional[torch.LongTensor] = None,
        timestamps: Optional[torch.LongTensor] = None,
        side_feature_ids: Optional[torch.LongTensor] = None,
        labels: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        deduplicate_histories: bool = False,
        candidate_age: Optional[torch.LongTensor] = None,
        **kwargs,
    ) -> PinFMForCTROutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                History item token ids followed by the candidate's, as the last real token of each row.
            side_feature_ids (`torch.LongTensor` of shape `(batch_size, num_slots)`, *optional*):
                Side-feature ids from `CTRFeatureEncoder` (required when `config.ctr_feature_vocab_size > 0`).
            labels (`torch.Tensor` of shape `(batch_size,)`, *optional*):
                1 for a click (or conversion), 0 otherwise.
            deduplicate_histories (`bool`, *optional*, defaults to `False`):
                Score through DCAT: rows with the same history and impression time are encoded once (impressions of
                one request), the candidates cross-attend to the cached history. Same logits as the plain path; the
                auxiliary loss then counts each distinct history once.
            candidate_age (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Seconds since the candidate item's first event, for the young-item dropout (training only).
            Other inputs: see [`PinFMModel.forward`]; `action_ids` mark the candidate with `config.candidate_action_id`.

        A row whose only real token is the candidate (a user without history) is scored from the candidate alone, with
        a zero `user_embedding`; a row without any real token has no candidate to score and raises a `ValueError`.
        """
        check_event_inputs(input_ids, attention_mask, action_ids, surface_ids, timestamps)
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        B, T = input_ids.shape
        valid = attention_mask.bool()
        if _checking_inputs() and not valid.any(dim=1).all():
            row = int((~valid.any(dim=1)).nonzero()[0])
            raise ValueError(f"Row {row} has no real token: each row needs its candidate as its last real token.")
        positions = torch.arange(T, device=input_ids.device)
        rows = torch.arange(B, device=input_ids.device)
        candidate_index = (valid.long() * positions).argmax(dim=1)  # last real token
        history = valid.clone()
        history[rows, candidate_index] = False
        candidate_ids = input_ids[rows, candidate_index]

        if deduplicate_histories:
            if output_hidden_states or output_attentions:
                raise ValueError("`deduplicate_histories=True` returns no per-layer hidden states or attentions.")
            logits, candidate_hidden, user_embedding, context = self._dcat(
                input_ids, history.long(), action_ids, surface_ids, timestamps,
                candidate_ids=candidate_ids,
                candidate_user_index=rows,
                request_timestamps=timestamps[rows, candidate_index] if timestamps is not None else None,
                candidate_side_feature_ids=side_feature_ids,
                candidate_surface_ids=surface_ids[rows, candidate_index] if surface_ids is not None else None,
                candidate_age=candidate_age,
                deduplicate=True,
            )
            hidden_states = attentions = None
        else:
            extra = None
            candidate_features = self.candidate_feature_embeddings(side_feature_ids)
            if candidate_features is not None:
                extra = torch.zeros(B, T, candidate_features.shape[-1], dtype=candidate_features.dtype, device=input_ids.device)
                extra[rows, candidate_index] = candidate_features
            outputs = self.pinfm(
                input_ids,
                attention_mask=attention_mask,
                action_ids=action_ids,
                surface_ids=surface_ids,
                timestamps=timestamps,
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
                extra_embeddings=extra,
            )
            has_history = history.any(dim=1)
            user_index = (history.long() * positions).argmax(dim=1)
            hidden = outputs.last_hidden_state
            candidate_hidden = hidden[rows, candidate_index]  # (B, H)
            user_embedding = hidden[rows, user_index] * has_history.unsqueeze(-1).to(hidden.dtype)  # (B, H)
            logits = self.ranking_logits(candidate_hidden, user_embedding, candidate_ids, side_feature_ids, candidate_age)
            hidden_states, attentions = outputs.hidden_states, outputs.attentions
            # Pretraining losses see history events only: the candidate's outcome is the label, not a target.
            context = (hidden, input_ids, action_ids, history)

        loss = ctr_loss = aux_loss = None
        if labels is not None:
            ctr_loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype).view(-1))
            loss = ctr_loss
            if self.config.ctr_aux_loss_weight > 0:
                hidden, context_ids, context_actions, context_valid = context
                query = F.normalize(self.query_proj(hidden), dim=-1)
                history_labels = context_ids.masked_fill(~context_valid, -100)
                aux_loss = self.weighted_loss(
                    self.pretraining_losses(query, history_labels, context_actions, context_valid.long())
                )
                loss = ctr_loss + self.config.ctr_aux_loss_weight * aux_loss
        return PinFMForCTROutput(
            loss=loss,
            logits=logits,
            ctr_loss=ctr_loss,
            aux_loss=aux_loss,
            candidate_hidden_state=candidate_hidden,
            user_embedding=user_embedding,
            hidden_states=hidden_states,
            attentions=attentions,
        )

    def score_candidates(
        self,
        input_ids: torch.LongTensor,
        candidate_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        action_ids: Optional[torch.LongTensor] = None,
        surface_ids: Optional[torch.LongTensor] = None,
        timestamps: Optional[torch.LongTensor] = None,
        candidate_user_index: Optional[torch.LongTensor] = None,
        request_timestamps: Optional[torch.LongTensor] = None,
        candidate_side_feature_ids: Optional[torch.LongTensor] = None,
        candidate_surface_ids: Optional[torch.LongTensor] = None,
        deduplicate: bool = True,
    ) -> torch.Tensor:
        r"""
        Score candidates for users with DCAT: one context pass per distinct user sequence caches every layer's keys and
        values; one crossing pass runs all candidates, each attending to its user's cache and to itself. The logits
        equal those of appending each candidate to its user's sequence and running `forward` (within float error).

        Args:
            input_ids (`torch.LongTensor` of shape `(num_users, sequence_length)`):
                The users' histories (no candidate token), either padding side. Other per-event inputs as in
                [`PinFMModel.forward`].
            candidate_ids (`torch.LongTensor` of shape `(num_users, num_candidates)` or `(N,)`):
                Item token ids to score: a row per user, or a flat list with `candidate_user_index`.
            candidate_user_index (`torch.LongTensor` of shape `(N,)`, *optional*):
                With flat `candidate_ids`: the user row of each candidate (users may have any number of candidates).
            request_timestamps (`torch.LongTensor` of shape `(num_users,)`, *optional*):
                Time of the request (the candidates' timestamp); defaults to each user's last event time.
            candidate_side_feature_ids (`torch.LongTensor` of shape `(..., num_slots)`, *optional*):
                Side features of each candidate impression, shaped like `candidate_ids` plus a slot axis.
            candidate_surface_ids (`torch.LongTensor`, *optional*):
                Surface of each impression, shaped like `candidate_ids`.
            deduplicate (`bool`, *optional*, defaults to `True`):
                Encode identical user rows (same history and request time) once.

        Returns:
            `torch.FloatTensor` shaped like `candidate_ids`: the logits; `sigmoid` gives probabilities.

        A user without history (an all-padding row) is allowed: each of its candidates attends only to itself, its
        late-fusion user embedding is zeros, and the other users' scores are those without it.
        """
        check_event_inputs(input_ids, attention_mask, action_ids, surface_ids, timestamps)
        num_users = input_ids.shape[0]
        shape = candidate_ids.shape
        if candidate_ids.dim() == 2:
            if candidate_ids.shape[0] != num_users:
                raise ValueError(
                    f"`candidate_ids` has {candidate_ids.shape[0]} rows for {num_users} users; pass one row "
                    "per user, or flat ids with `candidate_user_index`."
                )
            candidate_user_index = torch.arange(shape[0], device=input_ids.device).repeat_interleave(shape[1])
        elif candidate_ids.dim() != 1 or candidate_user_index is None or candidate_user_index.shape != shape:
            raise ValueError("Flat `candidate_ids` (N,) need `candidate_user_index` (N,): the user row of each.")
        elif candidate_user_index.numel() and _checking_inputs():
            low, high = torch.stack(torch.aminmax(candidate_user_index)).tolist()
            if low < 0 or high >= num_users:  # a negative index would silently score another user's candidates
                bad = low if low < 0 else high
                raise ValueError(f"`candidate_user_index` holds {bad}, not a user row in [0, {num_users}).")
        if candidate_ids.numel() == 0:
            raise ValueError("`candidate_ids` is empty: nothing to score.")
        check_ids_in_range(candidate_ids, self.config.item_vocab_size, "`candidate_ids`", "item_vocab_size")
        if request_timestamps is not None and request_timestamps.numel() != num_users:
            raise ValueError(f"`request_timestamps` has {request_timestamps.numel()} values for {num_users} users.")
        per_candidate = {
            "candidate_surface_ids": candidate_surface_ids, "candidate_side_feature_ids": candidate_side_feature_ids
        }
        for name, value in per_candidate.items():
            if value is not None and value.shape[: candidate_ids.dim()] != shape:
                raise ValueError(f"`{name}` has shape {tuple(value.shape)}, but `candidate_ids` has {tuple(shape)}.")
        flat = candidate_ids.reshape(-1)
        side = candidate_side_feature_ids.reshape(flat.numel(), -1) if candidate_side_feature_ids is not None else None
        surfaces = candidate_surface_ids.reshape(-1) if candidate_surface_ids is not None else None
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        logits, *_ = self._dcat(
            input_ids, attention_mask, action_ids, surface_ids, timestamps,
            candidate_ids=flat, candidate_user_index=candidate_user_index, request_timestamps=request_timestamps,
            candidate_side_feature_ids=side, candidate_surface_ids=surfaces, deduplicate=deduplicate,
        )
        return logits.view(shape)

    def _dcat(
        self,
        input_ids, attention_mask, action_ids, surface_ids, timestamps, *,
        candidate_ids, candidate_user_index, request_timestamps, candidate_side_feature_ids, candidate_surface_ids,
        deduplicate, candidate_age=None,
    ):
        """DCAT scoring of flat candidates; also returns candidate outputs, user embeddings and the context pass."""
        config = self.config
        device = input_ids.device
        valid = attention_mask.bool()
        if request_timestamps is None and timestamps is not None:
            request_timestamps = timestamps.masked_fill(~valid, torch.iinfo(timestamps.dtype).min).amax(dim=1)
        # Padding positions never matter: zero them so identical histories compare equal whatever they hold there.
        per_event = {"input_ids": input_ids, "action_ids": action_ids, "surface_ids": surface_ids, "timestamps": timestamps}
        per_event = {k: (v * valid) if v is not None else None for k, v in per_event.items()}
        user_index = candidate_user_index
        if deduplicate:
            keys = [v for v in per_event.values() if v is not None] + [valid.long()]
            if request_timestamps is not None:
                keys.append(request_timestamps.view(-1, 1))
            _, inverse = torch.unique(torch.cat(keys, dim=1), dim=0, return_inverse=True)
            num_unique = int(inverse.max()) + 1
            first = torch.full((num_unique,), valid.shape[0], device=device, dtype=torch.long)
            first = first.scatter_reduce(0, inverse, torch.arange(valid.shape[0], device=device), reduce="amin")
            per_event = {k: v[first] if v is not None else None for k, v in per_event.items()}
            valid = valid[first]
            request_timestamps = request_timestamps[first] if request_timestamps is not None else None
            user_index = inverse[candidate_user_index]

        # Context pass: once per distinct user, caching each layer's keys and values.
        context = self.pinfm(
            per_event["input_ids"],
            attention_mask=valid.long(),
            action_ids=per_event["action_ids"],
            surface_ids=per_event["surface_ids"],
            timestamps=per_event["timestamps"],
            end_timestamps=request_timestamps,
            return_key_values=True,
        )
        num_users = valid.shape[0]
        num_events = valid.sum(dim=1)  # (U,)

        # Lay the candidates out as (user, slot): the crossing pass runs them all at once.
        order = torch.argsort(user_index, stable=True)
        counts = torch.bincount(user_index, minlength=num_users)
        starts = counts.cumsum(0) - counts
        sorted_users = user_index[order]
        slots = torch.arange(order.numel(), device=device) - starts[sorted_users]
        width = int(counts.max())
        grid_ids = torch.full((num_users, width), config.pad_token_id, dtype=torch.long, device=device)
        grid_ids[sorted_users, slots] = candidate_ids[order]
        grid_actions = torch.full_like(grid_ids, config.candidate_action_id)
        grid_surfaces = None
        if candidate_surface_ids is not None:
            grid_surfaces = torch.zeros_like(grid_ids)
            grid_surfaces[sorted_users, slots] = candidate_surface_ids[order]
        time_embeddings = None
        if config.use_time_features:
            if timestamps is None:
                raise ValueError("`timestamps` are required: this model was configured with `use_time_features=True`.")
            last_event = per_event["timestamps"].masked_fill(~valid, torch.iinfo(timestamps.dtype).min).amax(dim=1)
            gap = (request_timestamps - last_event).clamp(min=0).view(-1, 1).expand(num_users, width)
            has_previous = (num_events > 0).view(-1, 1).expand(num_users, width)
            time_embeddings = self.pinfm.embeddings.candidate_time_features(gap, has_previous)
        candidate_embeddings = self.pinfm.embeddings.combine(grid_ids, grid_actions, grid_surfaces, time_embeddings)
        candidate_features = self.candidate_feature_embeddings(candidate_side_feature_ids)
        if candidate_features is not None:
            grid_features = torch.zeros_like(candidate_embeddings)
            grid_features[sorted_users, slots] = candidate_features[order].to(candidate_embeddings.dtype)
            candidate_embeddings = candidate_embeddings + grid_features
        positions = num_events.view(-1, 1).expand(num_users, width)
        crossed = self.pinfm.encode_candidates(candidate_embeddings, positions, context.key_values, valid)

        candidate_hidden = torch.empty(order.numel(), crossed.shape[-1], dtype=crossed.dtype, device=device)
        candidate_hidden[order] = crossed[sorted_users, slots]
        has_history = (num_events > 0).to(crossed.dtype).view(-1, 1)
        user_embedding = (context.user_embedding * has_history)[user_index]
        logits = self.ranking_logits(candidate_hidden, user_embedding, candidate_ids, candidate_side_feature_ids, candidate_age)
        context_inputs = (context.last_hidden_state, per_event["input_ids"], per_event["action_ids"], valid)
        return logits, candidate_hidden, user_embedding, context_inputs


__all__ = [
    "PINFM_LORA_TARGET_MODULES",
    "PinFMPreTrainedModel",
    "PinFMModel",
    "PinFMForPretraining",
    "PinFMForCTR",
    "PinFMModelOutput",
    "PinFMForCTROutput",
    "PinFMForPretrainingOutput",
]
