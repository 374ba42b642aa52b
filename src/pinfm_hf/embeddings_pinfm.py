"""PinFM's per-event input: the item table (one, hashed or quantised), action, surface and time-gap embeddings, and the
input MLP that mixes them into one token per event (PinFM). Also the input checks every model entry point shares.

Copied into saved model folders with `modeling_pinfm.py` for `trust_remote_code`: imports only torch, transformers
and its siblings.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_pinfm import PinFMConfig
from .quantization_pinfm import PinFMQuantizedEmbedding


# Universal hash h_j(x) = ((a_j * x + b_j) mod p) mod m of the hashed item tables. The a_j are near p, so the
# product wraps modulo p even for small ids (independent tables), and a_j * x stays below 2**63 for ids < 4e9.
_HASH_PRIME = 2_147_483_647  # 2**31 - 1
_HASH_MULTIPLIERS = (
    1_640_531_527, 1_103_515_245, 1_299_709_891, 2_038_074_743, 1_500_450_271, 1_776_614_203, 1_234_567_891, 1_957_312_541
)
_MAX_HASHED_VOCAB = 4_000_000_000


# Adapted from transformers.models.llama.modeling_llama.LlamaRMSNorm
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



class PinFMMLP(nn.Module):
    """SwiGLU feed-forward block (LLaMA)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))



def log_time_buckets(gaps: torch.Tensor, num_buckets: int) -> torch.LongTensor:
    """Bucket non-negative time gaps (seconds) on a half-octave log scale: bucket b ~ 2**(b / 2) seconds."""
    gaps = gaps.clamp(min=0).float()
    return (2.0 * torch.log2(1.0 + gaps)).long().clamp(max=num_buckets - 1)


def checking_inputs() -> bool:
    """Data-dependent input checks read a value back from the device: skip them while compiling or tracing."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing())


def check_ids_in_range(ids: torch.Tensor, size: int, name: str, field: str) -> None:
    """Raise `ValueError` unless every id of `ids` is in `[0, size)`: one fused min/max reduction, one read-back."""
    if ids.is_floating_point():
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}.")
    if ids.numel() == 0 or not checking_inputs():
        return
    low, high = torch.stack(torch.aminmax(ids)).tolist()
    if low < 0 or high >= size:
        bad = low if low < 0 else high
        raise ValueError(f"{name} hold id {bad}, outside the model's table [0, {size}) (`config.{field}`).")



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
        self,
        timestamps: torch.LongTensor,
        attention_mask: torch.Tensor,
        end_timestamps: Optional[torch.LongTensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
    ) -> torch.Tensor:
        """
        Bucketed gaps of each event to the previous event and to the *next* one (for the last event: to the request
        time, `end_timestamps`, or else gap 0). Both are causal: position `i` predicts event `i + 1` at the time
        `t[i + 1]`, which is the request time of that prediction; every earlier gap is readable from the tokens. (A gap
        to the sequence end would leak, to every position, how long the user stays after it.) In packed rows
        (`position_ids`), gaps stay within each sequence and `end_timestamps` has one value per sequence.
        """
        valid = attention_mask.bool()
        previous_valid, next_valid = torch.zeros_like(valid), torch.zeros_like(valid)
        previous_valid[:, 1:] = valid[:, :-1]
        next_valid[:, :-1] = valid[:, 1:]
        if position_ids is not None:  # packed: no gap across the boundary of two users' sequences
            starts = position_ids == 0
            previous_valid &= ~starts
            next_valid[:, :-1] &= ~starts[:, 1:]
        gap_prev = torch.zeros_like(timestamps)
        gap_prev[:, 1:] = timestamps[:, 1:] - timestamps[:, :-1]
        if checking_inputs():
            backwards = (gap_prev < 0) & previous_valid & valid  # (B, T): an event older than the one before it
            if backwards.any():
                row, position = (int(i) for i in backwards.nonzero()[0])
                raise ValueError(
                    f"`timestamps` must not decrease within a sequence (oldest event first): row {row} goes from "
                    f"{int(timestamps[row, position - 1])} to {int(timestamps[row, position])} at position {position}."
                )
        prev_bucket = log_time_buckets(gap_prev, self.config.num_time_buckets)
        prev_bucket = prev_bucket.masked_fill(~previous_valid, self.config.num_time_buckets)
        # The last event is followed by the request: the latest valid timestamp, wherever the padding is, or later.
        if position_ids is None:
            end = timestamps.masked_fill(~valid, torch.iinfo(timestamps.dtype).min).amax(dim=1, keepdim=True)  # (B, 1)
            if end_timestamps is not None:
                end = torch.maximum(end, end_timestamps.view(-1, 1))
        else:  # packed: each sequence's last event (timestamps do not decrease within it), or its request time
            end = timestamps
            if end_timestamps is not None:
                end = torch.maximum(end, end_timestamps.view(-1)[sequence_index(valid, position_ids)])
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
        position_ids: Optional[torch.LongTensor] = None,
    ) -> torch.Tensor:
        time_embeddings = None
        if self.config.use_time_features:
            if timestamps is None:
                raise ValueError("`timestamps` are required: this model was configured with `use_time_features=True`.")
            time_embeddings = self.time_features(timestamps, attention_mask, end_timestamps, position_ids)
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
    position_ids: Optional[torch.Tensor] = None,
) -> None:
    """
    Checks of per-event inputs: `(batch_size, sequence_length)` each, with events; with `position_ids` (packed
    rows), that they restart at each sequence (`check_packed_positions`, one device read-back).
    """
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
    if end_timestamps is not None and end_timestamps.numel() != B and position_ids is None:
        raise ValueError(f"`end_timestamps` has {end_timestamps.numel()} values for a batch of {B} rows.")
    if position_ids is not None:
        check_packed_positions(position_ids, input_ids.shape, attention_mask, end_timestamps)


# ----- packed rows: several users' sequences concatenated in one row, `position_ids` restarting at 0 at each -----

def event_positions(attention_mask: torch.Tensor) -> torch.LongTensor:
    """`(B, T)` position of each event among its row's real events (padding on either side): one sequence per row."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def packed_sequence_ids(position_ids: torch.LongTensor) -> torch.LongTensor:
    """`(B, T)` ordinal of each position's sequence within its row: a new sequence starts wherever a position is 0."""
    return (position_ids == 0).long().cumsum(dim=1)


def packed_sequence_ends(valid: torch.BoolTensor, position_ids: torch.LongTensor) -> torch.BoolTensor:
    """`(B, T)`: True at the last event of each packed sequence (in row-major order: the sequences' order)."""
    following = torch.zeros_like(valid)
    following[:, :-1] = valid[:, 1:] & (position_ids[:, 1:] != 0)
    return valid & ~following


def sequence_index(valid: torch.BoolTensor, position_ids: Optional[torch.LongTensor] = None) -> torch.LongTensor:
    """
    `(B, T)` index of each position's sequence in the batch, in row-major order: the row for unpacked rows; for packed
    rows, the count of sequences that start before it (padding gets its neighbour's index, never read).
    """
    if position_ids is None:
        return torch.arange(valid.shape[0], device=valid.device)[:, None].expand_as(valid)
    starts = (position_ids == 0) & valid
    return (starts.reshape(-1).long().cumsum(0) - 1).clamp(min=0).view_as(valid)


def check_packed_positions(
    position_ids: torch.Tensor,
    shape: tuple[int, int],
    attention_mask: Optional[torch.Tensor],
    end_timestamps: Optional[torch.Tensor],
) -> None:
    """
    Packed rows must be whole sequences: at every real event the position is 0 (a sequence starts) or one more than
    at the real event before it; `end_timestamps` then has one value per sequence.
    """
    if position_ids.is_floating_point() or tuple(position_ids.shape) != tuple(shape):
        raise ValueError(f"`position_ids` must be an integer tensor of shape {tuple(shape)}, got {position_ids.dtype} "
                         f"{tuple(position_ids.shape)}.")
    if not checking_inputs():
        return
    valid = torch.ones(shape, dtype=torch.bool, device=position_ids.device) if attention_mask is None else attention_mask.bool()
    previous = torch.full_like(position_ids, -2)
    previous[:, 1:] = position_ids[:, :-1].masked_fill(~valid[:, :-1], -2)
    bad = valid & (position_ids != 0) & (position_ids != previous + 1)
    if bad.any():
        row, position = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"`position_ids` must restart at 0 for each packed sequence and count up by 1 over its events: row {row} "
            f"has {int(position_ids[row, position])} at position {position} after "
            f"{int(previous[row, position]) if previous[row, position] >= 0 else 'no event'}."
        )
    if end_timestamps is not None:
        num_sequences = int(((position_ids == 0) & valid).sum())
        if end_timestamps.numel() != num_sequences:
            raise ValueError(f"`end_timestamps` has {end_timestamps.numel()} values for {num_sequences} packed sequences.")


__all__ = [
    "PinFMEventEmbedding",
    "PinFMItemEmbedding",
    "PinFMMLP",
    "PinFMRMSNorm",
    "check_event_inputs",
    "check_ids_in_range",
    "check_packed_positions",
    "event_positions",
    "log_time_buckets",
    "packed_sequence_ids",
    "packed_sequence_ends",
    "sequence_index",
]
