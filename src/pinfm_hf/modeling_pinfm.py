"""PinFM: a LLaMA-style causal transformer over user activity sequences (PinFM, GPSD), and its pretraining head.

Each event of a user's history is one token (`embeddings_pinfm.py`: item + action (+ surface) + time-gap features).
The encoder is pre-norm RMSNorm, rotary positions, SwiGLU, no biases (GPSD), with SDPA attention. The next-item head
is trained with PinFM's next-, multi- and future-token losses (`losses.py`); the CTR ranker is `modeling_pinfm_ctr.py`.
The `*_pinfm.py` files, `losses.py` and `io_utils.py` are copied into saved model folders for `trust_remote_code`:
they import only torch, transformers and each other.
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
from .embeddings_pinfm import (
    PinFMEventEmbedding,
    PinFMItemEmbedding,
    PinFMMLP,
    PinFMRMSNorm,
    check_event_inputs,
    event_positions,
    packed_sequence_ends,
    packed_sequence_ids,
)
from .losses import PretrainingObjective, next_item_losses, next_token_contrastive_loss, popularity_cdf
from .quantization_pinfm import QUANTIZATION_TYPES, PinFMQuantizedEmbedding


logger = logging.get_logger(__name__)

# Every saved folder serves every auto class (the files are copied beside it: see `save_pretrained`).
PINFM_AUTO_MAP = {
    "AutoConfig": "configuration_pinfm.PinFMConfig", "AutoModel": "modeling_pinfm.PinFMModel",
    "AutoModelForPreTraining": "modeling_pinfm.PinFMForPretraining",
    "AutoModelForSequenceClassification": "modeling_pinfm_ctr.PinFMForCTR",
}
# Checkpoints written before the next-item head became a module of its own (`next_item_head`) keep its weights at the
# top level; `from_pretrained` renames them (and transformers writes them back under their old names on save).
LEGACY_KEY_MAPPING = {r"^(query_proj|item_proj)\.": r"next_item_head.\1.", r"^(log_temperature|item_log_probs)$": r"next_item_head.\1"}
DEFAULT_TEMPERATURE = 0.05
# PEFT has no defaults for a custom model type: LoRA goes on the attention and SwiGLU projections.
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
        next_token_loss, multi_token_loss, future_token_loss, contrastive_loss (`torch.FloatTensor` of shape `()`, *optional*):
            The individual losses (unweighted), when `labels` is given and their weight is positive (the contrastive
            loss in training mode only: it compares two dropout passes).
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
    contrastive_loss: Optional[torch.FloatTensor] = None
    query_embeddings: Optional[torch.FloatTensor] = None
    user_embedding: Optional[torch.FloatTensor] = None
    last_hidden_state: Optional[torch.FloatTensor] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[tuple[torch.FloatTensor, ...]] = None


# A layer's output `(B, T, hidden)`, its attention probabilities (or None) and its rotated keys and values (or None).
LayerOutput = tuple[torch.Tensor, Optional[torch.Tensor], Optional[tuple[torch.Tensor, torch.Tensor]]]


def last_valid_index(attention_mask: torch.Tensor) -> torch.LongTensor:
    """`(B,)` index of each row's last real (non-padding) position, for either padding side; 0 for an empty row."""
    T = attention_mask.shape[1]
    return (attention_mask.long() * torch.arange(T, device=attention_mask.device)).argmax(dim=1)


def gather_last_valid(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`values[b, last_valid_index(b)]`: `(B, T, ...)` -> `(B, ...)`."""
    return values[torch.arange(values.shape[0], device=values.device), last_valid_index(attention_mask)]


def gather_sequence_ends(
    values: torch.Tensor, attention_mask: torch.Tensor, position_ids: Optional[torch.LongTensor] = None
) -> torch.Tensor:
    """
    `values` `(B, T, ...)` at each sequence's last event: `(B, ...)`, one per row, or with `position_ids` (packed
    rows) `(num_sequences, ...)`, one per sequence in the order they were packed.
    """
    if position_ids is None:
        return gather_last_valid(values, attention_mask)
    return values[packed_sequence_ends(attention_mask.bool(), position_ids)]


# The tokenizer's `<mask>` item id (the special item ids are padding, unknown, mask, candidate).
MASK_ITEM_ID = 2


def mask_random_items(
    input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor], probability: float, num_special_item_tokens: int
) -> torch.LongTensor:
    """
    `input_ids` with each real item (not padding or another special token) replaced by [`MASK_ITEM_ID`] with
    `probability`: CL4SRec's item-mask augmentation of a sequence. Returns `input_ids` itself when `probability` is 0.
    """
    if probability == 0:
        return input_ids
    maskable = input_ids >= num_special_item_tokens
    if attention_mask is not None:
        maskable &= attention_mask.bool()
    drawn = torch.rand(input_ids.shape, device=input_ids.device) < probability
    return input_ids.masked_fill(maskable & drawn, MASK_ITEM_ID)


def same_time_shuffle_index(
    timestamps: Optional[torch.LongTensor],
    attention_mask: Optional[torch.Tensor],
    position_ids: Optional[torch.LongTensor],
    probability: float,
) -> torch.LongTensor:
    """
    `(B, T)` gather index over the events that, with `probability` per run, reorders each run of events sharing a
    timestamp within one sequence (TiCoSeRec's reorder where the time interval is zero): logs with day-granularity
    times (Amazon reviews: 48% of consecutive events share a day) do not know the order within a day. Runs never
    cross a packed sequence's start or padding, and a run that is not drawn keeps its order.
    """
    if timestamps is None:
        raise ValueError("Reordering same-time events (`same_time_shuffle_prob`) needs the batch's `timestamps`.")
    valid = torch.ones_like(timestamps, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    starts = ~valid
    starts[:, 0] = True
    starts[:, 1:] |= (timestamps[:, 1:] != timestamps[:, :-1]) | ~valid[:, :-1]
    if position_ids is not None:
        starts |= position_ids == 0
    run = starts.long().cumsum(dim=1)  # (B, T), from 1
    drawn = torch.rand(run.shape[0], run.shape[1] + 1, device=run.device) < probability  # per run id
    noise = torch.rand(run.shape, dtype=torch.float64, device=run.device) * drawn.gather(1, run)
    return torch.sort(run.double() + noise, dim=1, stable=True).indices


def gather_events(index: torch.LongTensor, *events: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
    """Each `(B, T)` per-event tensor (None stays None) reordered by the gather `index` along the events."""
    return tuple(None if x is None else x.gather(1, index) for x in events)


def sequence_attention_mask(valid: torch.BoolTensor, position_ids: Optional[torch.LongTensor] = None) -> torch.BoolTensor:
    """
    `(B, 1, T, T)` boolean SDPA mask: causal over real events, and with `position_ids` (packed rows) block-diagonal, so
    each event sees only its own sequence. Padded queries attend to themselves only, so no softmax row is empty (no NaN).
    """
    T = valid.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    mask = causal & valid[:, None, :]
    if position_ids is not None:
        sequence_ids = packed_sequence_ids(position_ids)
        mask = mask & (sequence_ids[:, :, None] == sequence_ids[:, None, :])
    return (mask | torch.eye(T, dtype=torch.bool, device=valid.device))[:, None]


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
        self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention_mask: torch.BoolTensor,
        output_attentions: bool = False, return_key_value: bool = False, query_index: Optional[torch.LongTensor] = None,
    ) -> LayerOutput:
        """`query_index` `(B,)`: attend from that one position of each row only (keys and values still cover all)."""
        q, k, v = self.project(hidden_states, cos, sin, query_index)  # (B, H, T or 1, D) each
        if query_index is not None:
            attention_mask = attention_mask[torch.arange(q.shape[0], device=q.device), :, query_index][:, :, None]
        dropout = self.dropout if self.training else 0.0
        if output_attentions:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, T)
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            probs = F.dropout(scores.softmax(dim=-1), p=dropout, training=self.training)
            out = probs @ v
        else:
            probs = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout)
        B, T = q.shape[0], q.shape[2]
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H * D)
        return self.o_proj(out), probs, ((k, v) if return_key_value else None)

    def project(
        self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, query_index: Optional[torch.LongTensor] = None
    ) -> tuple[torch.Tensor, ...]:
        """Queries, keys (both rotated) and values, each `(B, heads, T, head_dim)`; queries `(B, heads, 1, head_dim)` at `query_index`."""
        B = hidden_states.shape[0]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(B, x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        k, v = heads(self.k_proj(hidden_states)), heads(self.v_proj(hidden_states))
        query_states, query_cos, query_sin = hidden_states, cos, sin
        if query_index is not None:
            rows = torch.arange(B, device=hidden_states.device)
            query_states = hidden_states[rows, query_index][:, None]  # (B, 1, hidden)
            query_cos, query_sin = cos[rows, :, query_index][:, :, None], sin[rows, :, query_index][:, :, None]
        q = heads(self.q_proj(query_states))
        return apply_rotary(q, query_cos, query_sin), apply_rotary(k, cos, sin), v

    def cross_attention(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        past_valid: Optional[torch.BoolTensor] = None,
    ) -> torch.Tensor:
        """
        DCAT crossing step: each of a user's C candidate tokens `(U, C, hidden)` attends to that user's cached history
        keys/values `(U, heads, T, head_dim)` (valid where `past_valid` `(U, T)`; `None`: all real) and to itself,
        never to the other candidates: the same result as appending each candidate to the sequence alone, in O(C * T),
        not O(C * T^2). `cos`/`sin` `(U, 1, 1, head_dim)` rotate to the candidates' position, one per user.

        All of a user's candidates sit at one rotary position p, so their queries and keys are never rotated: the
        self score q.k is the same unrotated (both turn by p), and R_p q . k_j = q . R_-p k_j, so the cached keys turn
        back by p instead, once per user rather than once per candidate.
        """
        U, C, _ = hidden_states.shape
        q, k, v = (
            proj(hidden_states).view(U, C, self.num_heads, self.head_dim).transpose(1, 2)  # (U, H, C, D)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        past_key = apply_rotary(past_key, cos, -sin)  # (U, H, T, D), relative to the candidates' position
        scale = 1.0 / math.sqrt(self.head_dim)
        self_scores = (q * k).sum(-1, keepdim=True) * scale  # (U, H, C, 1)
        dropout = self.dropout if self.training else 0.0
        if q.requires_grad or dropout > 0 or q.device.type != "cpu":
            history_scores = (q @ past_key.transpose(-2, -1)) * scale  # (U, H, C, T)
            if past_valid is not None:
                history_scores = history_scores.masked_fill(~past_valid[:, None, None, :], torch.finfo(q.dtype).min)
            probs = torch.cat([history_scores, self_scores], dim=-1).float().softmax(dim=-1).to(q.dtype)
            probs = F.dropout(probs, p=dropout, training=self.training)
            out = probs[..., :-1] @ past_value + probs[..., -1:] * v  # (U, H, C, D)
        else:
            out = self._fused_cross_attention(q, v, self_scores, past_key, past_value, past_valid, scale)
        return self.o_proj(out.transpose(1, 2).reshape(U, C, -1))

    @staticmethod
    def _fused_cross_attention(
        q: torch.Tensor,
        v: torch.Tensor,
        self_scores: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        past_valid: Optional[torch.BoolTensor],
        scale: float,
    ) -> torch.Tensor:
        """
        Inference on CPU: the history part through torch's fused flash kernel, which also returns each row's
        log-sum-exp, then the candidate's own key merged in exactly: with weight w = sigmoid(self - lse) on its own
        value, `out = lerp(history_out, v, w)`. No `(C, T)` score tensor is written, masked, concatenated or copied.
        """
        bias = None
        if past_valid is not None:  # finfo.min, not -inf: a user without history gets a finite lse, so w = 1
            bias = torch.zeros(past_valid.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~past_valid, torch.finfo(q.dtype).min)[:, None, None, :]  # (U, 1, 1, T)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, past_key, past_value, attn_mask=bias, scale=scale
        )  # (U, H, C, D), (U, H, C)
        weight = torch.sigmoid(self_scores.float() - lse.unsqueeze(-1)).to(out.dtype)  # (U, H, C, 1)
        return torch.lerp(out, v, weight)


class PinFMLayer(GradientCheckpointingLayer):
    def __init__(self, config: PinFMConfig):
        super().__init__()
        self.input_layernorm = PinFMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = PinFMAttention(config)
        self.post_attention_layernorm = PinFMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = PinFMMLP(config.hidden_size, config.intermediate_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention_mask: torch.BoolTensor,
        output_attentions: bool = False, return_key_value: bool = False, query_index: Optional[torch.LongTensor] = None,
    ) -> LayerOutput:
        """`query_index` `(B,)`: the layer's output at that one position of each row only, `(B, 1, hidden)`."""
        attn_out, probs, key_value = self.self_attn(
            self.input_layernorm(hidden_states), cos, sin, attention_mask, output_attentions, return_key_value, query_index
        )
        if query_index is not None:
            hidden_states = hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), query_index][:, None]
        hidden_states = hidden_states + self.dropout(attn_out)
        hidden_states = hidden_states + self.dropout(self.mlp(self.post_attention_layernorm(hidden_states)))
        return hidden_states, probs, key_value

    def cross_forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_key_value: tuple[torch.Tensor, torch.Tensor],
        past_valid: Optional[torch.BoolTensor] = None,
    ) -> torch.Tensor:
        """The layer for DCAT candidate tokens: cross-attention to the cached history instead of self-attention."""
        attn_out = self.self_attn.cross_attention(self.input_layernorm(hidden_states), cos, sin, *past_key_value, past_valid)
        hidden_states = hidden_states + self.dropout(attn_out)
        return hidden_states + self.dropout(self.mlp(self.post_attention_layernorm(hidden_states)))


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
        # `save_pretrained` copies the model's file and its relative imports for `trust_remote_code`, so the two
        # imports below put the ranking model's file and the recommendation pipeline into every folder.
        from .modeling_pinfm_ctr import PinFMForCTR  # noqa: F401
        from .pipeline_pinfm import saved_custom_pipelines

        self.config.auto_map = {**PINFM_AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
        # `pipeline(model=folder, trust_remote_code=True)` recommends with the pretraining head; encoder and CTR
        # folders do not inherit the entry from their base's config.
        self.config.custom_pipelines = saved_custom_pipelines() if type(self) is PinFMForPretraining else {}
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """
        [`~transformers.PreTrainedModel.from_pretrained`] (also of checkpoints written before the next-item head became
        a module: `LEGACY_KEY_MAPPING`), then a check that every loaded weight is finite: NaN or inf weights would
        make every score NaN, so serving would rank nothing (an empty recommendation list).
        """
        kwargs.setdefault("key_mapping", LEGACY_KEY_MAPPING)
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
        if isinstance(module, PinFMNextItemHead):
            init.constant_(module.log_temperature, math.log(DEFAULT_TEMPERATURE))
            init.zeros_(module.item_log_probs)

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

    Packed rows (`position_ids`, from `PinFMDataCollator(pack_length=...)`) hold several users' sequences each, so
    short histories cost no compute on padding: attention is block-diagonal (each event sees only the earlier events
    of its own sequence), and positions and time features restart at each sequence, so every event's hidden state
    is the one it has in a batch of one sequence per row.
    """

    # The encoder loads from head checkpoints (e.g. pretraining): their head weights are expected leftovers.
    _keys_to_ignore_on_load_unexpected = [r"^next_item_head\.", r"^ctr_"]

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
        end_timestamps: Optional[torch.LongTensor] = None,
        return_key_values: bool = False,
        extra_embeddings: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        user_embedding_only: bool = False,
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
            position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Packed rows: each event's position within its own sequence, 0 where a sequence starts (padding, if
                any, after the last sequence of a row). `end_timestamps` then has one value per sequence, and
                `user_embedding` one row per sequence, in order. Without it each row is one sequence.
            user_embedding_only (`bool`, *optional*, defaults to `False`):
                Run the last layer at each row's last real event only, the one `user_embedding` reads: what DCAT's
                context pass needs besides the keys and values, which every layer still computes over all events.
                `last_hidden_state` is then `(batch_size, 1, hidden_size)`, that event's. Not with packed rows,
                `output_hidden_states` or `output_attentions`.

        Ids outside their vocabulary (`config.item_vocab_size`, `action_vocab_size`, `surface_vocab_size`) and
        timestamps that decrease within a row raise a `ValueError`, as does an input without events
        (`sequence_length` 0).
        """
        if attention_mask is None and input_ids is not None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        check_event_inputs(input_ids, attention_mask, action_ids, surface_ids, timestamps, end_timestamps, position_ids)
        output_hidden_states = bool(output_hidden_states)
        output_attentions = bool(output_attentions)
        if user_embedding_only and (position_ids is not None or output_hidden_states or output_attentions):
            raise ValueError("`user_embedding_only` keeps one position per row: not with `position_ids`, "
                             "`output_hidden_states` or `output_attentions`.")
        valid = attention_mask.bool()  # (B, T)

        hidden_states = self.embeddings(
            input_ids, attention_mask, action_ids, surface_ids, timestamps, end_timestamps, position_ids
        )
        if extra_embeddings is not None:
            hidden_states = hidden_states + extra_embeddings
        positions = event_positions(valid) if position_ids is None else position_ids  # (B, T)
        hidden_states = self.add_position_embeddings(hidden_states, positions)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, hidden_states.dtype)
        mask = sequence_attention_mask(valid, position_ids)  # (B, 1, T, T)

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        key_values = () if return_key_values else None
        last_layer_query = last_valid_index(valid) if user_embedding_only else None
        for index, layer in enumerate(self.layers):
            query_index = last_layer_query if index == len(self.layers) - 1 else None
            hidden_states, probs, key_value = layer(
                hidden_states, cos, sin, mask, output_attentions, return_key_values, query_index
            )
            if return_key_values:
                key_values += (key_value,)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (probs,)
        hidden_states = self.norm(hidden_states)

        if position_ids is None:
            has_events = valid.any(dim=1, keepdim=True).to(hidden_states.dtype)  # (B, 1): an all-padding row gets zeros
            last = hidden_states[:, 0] if user_embedding_only else gather_last_valid(hidden_states, valid)
            user_embedding = last * has_events  # (B, H)
        else:
            user_embedding = gather_sequence_ends(hidden_states, valid, position_ids)  # (num_sequences, H)
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
        past_valid: Optional[torch.BoolTensor] = None,
    ) -> torch.Tensor:
        """
        DCAT crossing pass: run `(U, C, hidden)` candidate tokens (from `embeddings.combine`) through every layer,
        each attending to its user's cached `key_values` (valid where `past_valid` `(U, T)`; `None`: every cached
        event is real) and itself, at rotary position `candidate_positions` `(U,)` (the user's number of events,
        shared by all its candidates). Returns the final-norm outputs `(U, C, hidden)`.
        """
        positions = candidate_positions.view(-1, 1)  # (U, 1): one position per user, broadcast over its candidates
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, candidate_embeddings.dtype)
        hidden_states = self.add_position_embeddings(candidate_embeddings, positions)
        for layer, layer_key_values in zip(self.layers, key_values):
            hidden_states = layer.cross_forward(hidden_states, cos, sin, layer_key_values, past_valid)
        return self.norm(hidden_states)


class PinFMNextItemHead(nn.Module):
    """
    Next-item scoring head: dot products of L2-normalised projections of a hidden state (the query) and of an item
    embedding, over a learnable temperature; trained with PinFM's next-, multi- and future-token losses
    ([`~pinfm_hf.losses.next_item_losses`]). [`PinFMForPretraining`] holds one, and so does [`PinFMForCTR`] when it
    keeps an auxiliary next-item loss.
    """

    def __init__(self, config: PinFMConfig):
        super().__init__()
        self.config = config
        self.query_proj = nn.Linear(config.hidden_size, config.projection_size, bias=False)
        self.item_proj = nn.Linear(config.hidden_size, config.projection_size, bias=False)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(DEFAULT_TEMPERATURE)))
        # Log popularity of every item id (for popularity negatives and logQ); zeros until `set_item_counts`.
        self.register_buffer("item_log_probs", torch.zeros(config.item_vocab_size))

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(min=1e-3)

    @torch.no_grad()
    def init_temperature(self, temperature: float) -> None:
        """Start training from this temperature (`PretrainingObjective.initial_temperature`)."""
        self.log_temperature.fill_(math.log(temperature))

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
        return self.popularity_cdf() is not None

    def popularity_cdf(self) -> Optional[torch.Tensor]:
        """
        The items' cumulative sampling distribution ([`popularity_cdf`]) from `item_log_probs`, or None before
        `set_item_counts`. Cached until the buffer changes (counts set, a checkpoint loaded, a move to another device),
        so that no training step sweeps a tensor of the vocabulary's size.
        """
        key = (self.item_log_probs.data_ptr(), self.item_log_probs._version)
        if getattr(self, "_popularity_key", None) != key:
            counted = bool(self.item_log_probs.any())
            self._popularity = popularity_cdf(self.item_log_probs, self.config.num_special_item_tokens) if counted else None
            self._popularity_key = key
        return self._popularity

    def query(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """L2-normalised query embeddings `(..., projection_size)` of hidden states `(..., hidden_size)`."""
        return F.normalize(self.query_proj(hidden_states), dim=-1)

    def item_embeddings(self, item_ids: torch.LongTensor, item_table: nn.Module) -> torch.Tensor:
        """L2-normalised scoring embeddings of `item_ids` (any shape `(...)` -> `(..., projection_size)`)."""
        return F.normalize(self.item_proj(item_table(item_ids)), dim=-1)

    def losses(
        self,
        query: torch.Tensor,
        labels: torch.LongTensor,
        attention_mask: Optional[torch.Tensor],
        item_table: nn.Module,
        objective: PretrainingObjective,
        position_ids: Optional[torch.LongTensor] = None,
    ) -> dict[str, torch.Tensor]:
        """
        The unweighted losses of `objective` for queries `(B, T, P)` and `labels` `(B, T)` (-100: not a target);
        `position_ids` for packed rows (pairs never cross two sequences).
        """
        return next_item_losses(
            query, labels, attention_mask, position_ids=position_ids, objective=objective,
            item_embeddings=lambda ids: self.item_embeddings(ids, item_table), temperature=self.temperature,
            item_log_probs=self.item_log_probs if self.has_item_counts else None, sampling_cdf=self.popularity_cdf(),
            num_special_tokens=self.config.num_special_item_tokens, vocab_size=self.config.item_vocab_size,
        )


class PinFMForPretraining(PinFMPreTrainedModel):
    """
    PinFM encoder with a next-item scoring head ([`PinFMNextItemHead`]), trained with PinFM's next-token,
    multi-token and future-token losses: negatives from the batch and from the vocabulary (uniform or by popularity,
    with logQ correction and accidental-hit masking), or the full softmax. Which losses and negatives is the model's
    `objective` ([`~pinfm_hf.losses.PretrainingObjective`]), set by the recipe; it is not saved with the model.
    """

    def __init__(self, config: PinFMConfig):
        super().__init__(config)
        self.pinfm = PinFMModel(config)
        self.next_item_head = PinFMNextItemHead(config)
        self.objective = PretrainingObjective()
        self.post_init()

    @property
    def temperature(self) -> torch.Tensor:
        return self.next_item_head.temperature

    def set_item_counts(self, counts: torch.Tensor) -> None:
        self.next_item_head.set_item_counts(counts)

    @property
    def has_item_counts(self) -> bool:
        return self.next_item_head.has_item_counts

    def item_embeddings(self, item_ids: torch.LongTensor) -> torch.Tensor:
        """L2-normalised scoring embeddings of `item_ids` (any shape `(...)` -> `(..., projection_size)`)."""
        return self.next_item_head.item_embeddings(item_ids, self.pinfm.embeddings.item_embeddings)

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

    def score_next_items(
        self,
        query_embeddings: torch.Tensor,
        *,
        num_scored_ids: Optional[int] = None,
        exclude_ids: Optional[torch.LongTensor] = None,
    ) -> torch.Tensor:
        """
        Scores `(batch_size, item_vocab_size)` of every item as the next event of each query `(batch_size,
        projection_size)` (the query at a user's last event: [`~PinFMForPretraining.next_item_query`]), with special
        tokens, ids from `num_scored_ids` on (the tokenizer's hash buckets, which are not items) and each row's
        `exclude_ids` `(batch_size, K)` at `-inf`. What evaluation, the recommendation pipeline and retrieval rank by.
        """
        scores = self.score_items(query_embeddings)
        if num_scored_ids is not None:
            scores[:, num_scored_ids:] = float("-inf")
        if exclude_ids is not None:
            scores = scores.scatter(1, exclude_ids, float("-inf"))
        return scores

    def next_item_query(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        **event_inputs,
    ) -> torch.Tensor:
        """
        The L2-normalised query `(batch_size, projection_size)` at each user's last event (`end_timestamps` in
        `event_inputs` is the request time): the user embedding that [`~PinFMForPretraining.score_next_items`] scores.
        With `position_ids` (packed rows), one query per sequence: `(num_sequences, projection_size)`.
        """
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        hidden = self.pinfm(input_ids, attention_mask=attention_mask, position_ids=position_ids, **event_inputs).last_hidden_state
        # Projected at every position, as `forward` does, then gathered: the same numbers as `forward`'s query, to the bit.
        return gather_sequence_ends(self.next_item_head.query(hidden), attention_mask, position_ids)

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
        position_ids: Optional[torch.LongTensor] = None,
    ) -> PinFMForPretrainingOutput:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Item ids of the events, aligned with `input_ids` (usually a copy) and `-100` where an event is not a
                target (padding, or an action that is not a positive: `PinFMDataCollator(positive_action_ids=...)`);
                the model shifts them itself. The losses are those of `self.objective`.
            Other inputs: see [`PinFMModel.forward`]. An all-padding row is allowed (no loss term, zero
            `user_embedding`) and leaves the other rows' outputs unchanged. Packed rows (`position_ids`) give the
            same hidden states, query/target pairs and losses as the same sequences one per row.
        """
        if labels is not None and input_ids is not None and labels.shape != input_ids.shape:
            raise ValueError(f"`labels` has shape {tuple(labels.shape)}, but `input_ids` has {tuple(input_ids.shape)}.")
        if self.training and labels is not None and self.objective.same_time_shuffle_prob > 0:
            index = same_time_shuffle_index(timestamps, attention_mask, position_ids, self.objective.same_time_shuffle_prob)
            input_ids, labels, action_ids, surface_ids = gather_events(index, input_ids, labels, action_ids, surface_ids)
        event_inputs = dict(
            attention_mask=attention_mask, action_ids=action_ids, surface_ids=surface_ids, timestamps=timestamps,
            end_timestamps=end_timestamps, position_ids=position_ids,
        )
        outputs = self.pinfm(
            input_ids, output_hidden_states=output_hidden_states, output_attentions=output_attentions, **event_inputs
        )
        query = self.next_item_head.query(outputs.last_hidden_state)  # (B, T, P)
        losses = {}
        if labels is not None:
            losses = self.next_item_head.losses(
                query, labels, attention_mask, self.pinfm.embeddings.item_embeddings, self.objective, position_ids
            )
            if self.training and self.objective.contrastive_loss_weight > 0:
                # A second pass draws other dropout masks (DuoRec), on inputs with some items masked (CL4SRec) and
                # same-time events reordered (TiCoSeRec): the second view of every query.
                second_input_ids, second_inputs = input_ids, event_inputs
                if self.objective.contrastive_same_time_shuffle_prob > 0:
                    index = same_time_shuffle_index(
                        timestamps, attention_mask, position_ids, self.objective.contrastive_same_time_shuffle_prob
                    )
                    second_input_ids, second_actions, second_surfaces = gather_events(index, input_ids, action_ids, surface_ids)
                    second_inputs = dict(event_inputs, action_ids=second_actions, surface_ids=second_surfaces)
                second_input_ids = mask_random_items(
                    second_input_ids, attention_mask, self.objective.contrastive_item_mask_prob, self.config.num_special_item_tokens
                )
                second_query = self.next_item_head.query(self.pinfm(second_input_ids, **second_inputs).last_hidden_state)
                losses["contrastive"] = next_token_contrastive_loss(
                    query, second_query, labels, attention_mask, position_ids=position_ids, objective=self.objective
                )
        return PinFMForPretrainingOutput(
            loss=self.objective.weighted_sum(losses) if losses else None,
            next_token_loss=losses.get("next_token"),
            multi_token_loss=losses.get("multi_token"),
            future_token_loss=losses.get("future_token"),
            contrastive_loss=losses.get("contrastive"),
            query_embeddings=query,
            user_embedding=outputs.user_embedding,
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "PINFM_LORA_TARGET_MODULES",
    "PinFMModel",
    "PinFMModelOutput",
    "PinFMForPretraining",
    "PinFMForPretrainingOutput",
    "PinFMNextItemHead",
    "PinFMPreTrainedModel",
    "gather_last_valid",
    "gather_sequence_ends",
    "last_valid_index",
    "mask_random_items",
    "same_time_shuffle_index",
]
