"""PinFM as the sequence tower of a CTR/CVR ranking model (PinFM, GPSD), scored in serving with DCAT.

[`PinFMForCTR`] holds the encoder (`pinfm`), a ranking head, optional side-feature embeddings and, when it keeps an
auxiliary next-item loss, a next-item head of its own. It is a sibling of [`PinFMForPretraining`], not a child: a
pretrained checkpoint loads into it by parameter name (`pinfm.*`, `next_item_head.*`).

Copied into saved model folders with `modeling_pinfm.py` for `trust_remote_code`: imports only torch, transformers
and its siblings.
"""

import itertools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_pinfm import PinFMConfig
from .embeddings_pinfm import check_event_inputs, check_ids_in_range, checking_inputs
from .losses import PretrainingObjective
from .modeling_pinfm import PinFMModel, PinFMNextItemHead, PinFMPreTrainedModel, last_valid_index


# Config switches of the ranking head's history features ([`PinFMForCTR.history_counts`]).
HISTORY_FEATURE_FIELDS = ("ctr_history_count_features", "ctr_history_recency_features", "ctr_history_field_match_features")


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



@dataclass
class PinFMDCATOutput(ModelOutput):
    """
    Output of [`PinFMForCTR.dcat`]: the scores of `N` candidates and what the auxiliary loss reads of the context pass.

    Args:
        logits (`torch.FloatTensor` of shape `(N,)`): click (or conversion) logit of each candidate.
        candidate_hidden_state (`torch.FloatTensor` of shape `(N, hidden_size)`): encoder output at each candidate.
        user_embedding (`torch.FloatTensor` of shape `(N, hidden_size)`):
            Output at the last history event of each candidate's user (zeros for a user without history).
        context_hidden_state (`torch.FloatTensor` of shape `(U, sequence_length, hidden_size)`):
            Final hidden states of the context pass over the `U` distinct user histories.
        context_input_ids (`torch.LongTensor` of shape `(U, sequence_length)`): their item ids (0 at padding).
        context_attention_mask (`torch.BoolTensor` of shape `(U, sequence_length)`): their real events.
    """

    logits: Optional[torch.FloatTensor] = None
    candidate_hidden_state: Optional[torch.FloatTensor] = None
    user_embedding: Optional[torch.FloatTensor] = None
    context_hidden_state: Optional[torch.FloatTensor] = None
    context_input_ids: Optional[torch.LongTensor] = None
    context_attention_mask: Optional[torch.BoolTensor] = None


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


class PinFMItemBias(nn.Module):
    """One learnt scalar per item id, added to the ranking logit: how often the item is liked, whatever the user."""

    def __init__(self, config: PinFMConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.item_vocab_size))

    def forward(self, candidate_ids: torch.LongTensor) -> torch.Tensor:
        return self.weight[candidate_ids]


class PinFMItemFeatureTable(nn.Module):
    """
    Each item id's side-feature ids for the item fields (`ctr_item_feature_fields`, their slots side by side as in
    `side_feature_ids`), so history events can be matched to the candidate by field (genre, category) without side
    features of their own. Data, not weights: filled by [`PinFMForCTR.set_item_features`], saved with the model and
    with a LoRA adapter (the feature vocabulary is each use case's own); 0 (padding) for ids it does not know.
    """

    def __init__(self, config: PinFMConfig):
        super().__init__()
        width = sum(config.ctr_feature_slots[f] for f in config.ctr_item_feature_fields)
        # int32: 10^6 items x 8 slots is 32 MB.
        self.register_buffer("item_feature_ids", torch.zeros(config.item_vocab_size, width, dtype=torch.int32))

    def forward(self, item_ids: torch.LongTensor) -> torch.Tensor:
        return self.item_feature_ids[item_ids]


def candidate_history_matches(
    history_ids: torch.LongTensor, history: torch.BoolTensor, candidate_ids: torch.LongTensor, user_index: torch.LongTensor
) -> torch.BoolTensor:
    """`(N, T)`: which real events (`history` `(U, T)`) of each candidate's user `user_index` `(N,)` are on its item."""
    return (history_ids[user_index] == candidate_ids[:, None]) & history[user_index]


def history_field_matches(
    history_feature_ids: torch.Tensor,
    history: torch.BoolTensor,
    candidate_feature_ids: torch.LongTensor,
    user_index: torch.LongTensor,
) -> torch.BoolTensor:
    """
    `(N, T)`: which real events (`history` `(U, T)`) of each candidate's user `user_index` `(N,)` share a value of one
    field with the candidate: `history_feature_ids` `(U, T, S)` are the events' items' slots of that field,
    `candidate_feature_ids` `(N, S)` the candidate's. Padding (0) and unknown values (1) match nothing.
    """
    known = candidate_feature_ids > 1  # (N, S)
    same = history_feature_ids[user_index].unsqueeze(-1) == candidate_feature_ids[:, None, None, :]  # (N, T, S, S)
    return (same & known[:, None, None, :]).flatten(2).any(dim=-1) & history[user_index]


def history_action_counts(
    history_ids: torch.LongTensor,
    history_actions: torch.LongTensor,
    history: torch.BoolTensor,
    candidate_ids: torch.LongTensor,
    user_index: torch.LongTensor,
    action_vocab_size: int,
    match: Optional[torch.BoolTensor] = None,
) -> torch.Tensor:
    """
    Per action id, `log1p` of how many events of each user's history `(U, T)` (real events where `history`) have it,
    then of how many of those are on the candidate item: `(N, 2 * action_vocab_size)` for candidates `(N,)` of users
    `user_index` `(N,)`. Token ids are compared, so two fresh items sharing a hash bucket also match. `match`:
    `candidate_history_matches`, when the caller has it.
    """
    actions = history_actions.masked_fill(~history, 0)
    all_counts = history.new_zeros(history.shape[0], action_vocab_size, dtype=torch.float32)
    all_counts.scatter_add_(1, actions, history.to(torch.float32))  # (U, A)
    if match is None:
        match = candidate_history_matches(history_ids, history, candidate_ids, user_index)  # (N, T)
    match_counts = match.new_zeros(match.shape[0], action_vocab_size, dtype=torch.float32)
    match_counts.scatter_add_(1, actions[user_index], match.to(torch.float32))  # (N, A)
    return torch.log1p(torch.cat([all_counts[user_index], match_counts], dim=-1))


def history_action_recency(
    history_ids: torch.LongTensor,
    history_actions: torch.LongTensor,
    history_timestamps: torch.LongTensor,
    history: torch.BoolTensor,
    request_timestamps: torch.LongTensor,
    candidate_ids: torch.LongTensor,
    user_index: torch.LongTensor,
    action_vocab_size: int,
    match: Optional[torch.BoolTensor] = None,
) -> torch.Tensor:
    """
    Per action id, `log1p` of the seconds from each user's latest history event `(U, T)` with it (real events where
    `history`) to the user's request time `(U,)`, then from the latest of those on the candidate item: `(N, 2 *
    action_vocab_size)` for candidates `(N,)` of users `user_index` `(N,)`; 0 where there is no such event. `match`:
    `candidate_history_matches`, when the caller has it.
    """
    actions = history_actions.masked_fill(~history, 0)
    never = torch.iinfo(history_timestamps.dtype).min
    times = history_timestamps.masked_fill(~history, never)

    def latest(event_times: torch.Tensor, event_actions: torch.Tensor) -> torch.Tensor:  # (R, T) -> (R, A)
        out = event_times.new_full((event_times.shape[0], action_vocab_size), never)
        return out.scatter_reduce_(1, event_actions, event_times, reduce="amax")

    if match is None:
        match = candidate_history_matches(history_ids, history, candidate_ids, user_index)  # (N, T)
    per_user, per_candidate = latest(times, actions)[user_index], latest(times[user_index].masked_fill(~match, never), actions[user_index])
    now = request_timestamps[user_index][:, None]

    def age(latest_time: torch.Tensor) -> torch.Tensor:
        missing = latest_time == never
        seconds = (now - latest_time.masked_fill(missing, 0)).clamp(min=0).to(torch.float32)
        return torch.log1p(seconds).masked_fill(missing, 0.0)

    return torch.cat([age(per_user), age(per_candidate)], dim=-1)


class PinFMForCTR(PinFMPreTrainedModel):
    """
    PinFM with a ranking head for CTR/CVR, fine-tuned from a pretrained checkpoint.

    The candidate is the last token of each sequence (candidate action marker, impression time). Early fusion scores
    the candidate's output position, where the candidate has attended to the whole history (PinFM, GPSD). Late
    fusion combines the output at the last history event (which, the encoder being causal, has not seen the
    candidate) with the candidate's item embedding; both come from one encoder pass. Side features (user and item
    fields) join in the ranking head. With `config.ctr_aux_loss_weight > 0` the model keeps a next-item head
    (`next_item_head`, loaded from the pretrained checkpoint) and adds its loss on the history events, as PinFM does,
    following `self.objective` ([`~pinfm_hf.losses.PretrainingObjective`]).

    [`PinFMForCTR.score_candidates`] scores many candidates per user with DCAT (PinFM's deduplicated
    cross-attention): each distinct user sequence is encoded once, and candidates attend to its cached keys/values.
    """

    # Pretraining checkpoints carry a next-item head, which a ranker without the auxiliary loss does not use.
    _keys_to_ignore_on_load_unexpected = [r"^next_item_head\."]

    def __init__(self, config: PinFMConfig):
        super().__init__(config)
        self.pinfm = PinFMModel(config)
        self.next_item_head = PinFMNextItemHead(config) if config.ctr_aux_loss_weight > 0 else None
        self.objective = PretrainingObjective()
        self.ctr_feature_embeddings = PinFMSideFeatureEmbedding(config) if config.ctr_feature_vocab_size else None
        head_input = config.hidden_size if config.ctr_fusion == "early" else 3 * config.hidden_size
        if self.ctr_feature_embeddings is not None:
            head_input += self.ctr_feature_embeddings.output_size
        if config.ctr_history_count_features:
            head_input += 2 * config.action_vocab_size
        if config.ctr_history_recency_features:
            head_input += 2 * config.action_vocab_size
        self.ctr_item_features = None
        if config.ctr_history_field_match_features:
            self.ctr_item_features = PinFMItemFeatureTable(config)
            # Per item field: (its first column in `side_feature_ids`, in the table, its width), derived once.
            side_start = [0, *itertools.accumulate(config.ctr_feature_slots)]
            table_start = [0, *itertools.accumulate(config.ctr_feature_slots[f] for f in config.ctr_item_feature_fields)]
            self.item_field_columns = [
                (side_start[f], table_start[i], config.ctr_feature_slots[f]) for i, f in enumerate(config.ctr_item_feature_fields)
            ]
            per_field = 2 if config.ctr_history_recency_features else 1
            head_input += per_field * len(config.ctr_item_feature_fields) * config.action_vocab_size
        self.ctr_head = PinFMRankingHead(config, head_input)
        self.ctr_item_bias = PinFMItemBias(config) if config.ctr_item_bias else None
        self.ctr_candidate_feature_proj = None
        if config.ctr_candidate_item_features:
            width = len(config.ctr_item_feature_fields) * config.ctr_feature_embedding_size
            self.ctr_candidate_feature_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, PinFMItemBias):
            init.zeros_(module.weight)  # no item preferred before training
        if isinstance(module, PinFMItemFeatureTable):
            init.zeros_(module.item_feature_ids)  # no item's fields known until `set_item_features`

    @torch.no_grad()
    def set_item_features(self, item_ids: torch.LongTensor, item_feature_ids: torch.Tensor) -> None:
        """
        Record the item-field side-feature ids `(K, S)` of the item token ids `(K,)` (the slots of
        `ctr_item_feature_fields`, side by side, as `CTRFeatureEncoder.encode(..., fields=item fields)` gives them),
        for `ctr_history_field_match_features`. Ids not given stay unknown (they match nothing).
        """
        if self.ctr_item_features is None:
            raise ValueError("This model was not configured with `ctr_history_field_match_features`.")
        table = self.ctr_item_features.item_feature_ids
        if item_feature_ids.shape != (item_ids.shape[0], table.shape[1]):
            raise ValueError(
                f"`item_feature_ids` must have shape ({item_ids.shape[0]}, {table.shape[1]}) (items, item-field slots), "
                f"got {tuple(item_feature_ids.shape)}."
            )
        if item_ids.numel() and (item_ids.min() < 0 or item_ids.max() >= table.shape[0]):
            raise ValueError(f"`item_ids` must be item token ids below `item_vocab_size` ({table.shape[0]}).")
        table[item_ids.to(table.device)] = item_feature_ids.to(table)

    def history_counts(
        self,
        history_ids: torch.LongTensor,
        history_actions: Optional[torch.LongTensor],
        history: torch.BoolTensor,
        candidate_ids: torch.LongTensor,
        user_index: torch.LongTensor,
        history_timestamps: Optional[torch.LongTensor] = None,
        request_timestamps: Optional[torch.LongTensor] = None,
        candidate_side_feature_ids: Optional[torch.LongTensor] = None,
    ) -> Optional[torch.Tensor]:
        """
        The history features of each candidate the config asks for: `history_action_counts`, then
        `history_action_recency` (`history_timestamps` `(U, T)`, `request_timestamps` `(U,)`), then per item field the
        same on the events that share a value of the field with the candidate (`candidate_side_feature_ids` `(N, S)`);
        None without any.
        """
        config = self.config
        wanted = [name for name in HISTORY_FEATURE_FIELDS if getattr(config, name)]
        if not wanted:
            return None
        if history_actions is None:
            raise ValueError(f"`action_ids` are required: this model was configured with `{wanted[0]}`.")
        if config.ctr_history_recency_features and (history_timestamps is None or request_timestamps is None):
            raise ValueError("`timestamps` are required: this model was configured with `ctr_history_recency_features`.")
        if config.ctr_history_field_match_features and candidate_side_feature_ids is None:
            raise ValueError("`side_feature_ids` are required: this model was configured with `ctr_history_field_match_features`.")

        A = config.action_vocab_size

        def counts(match: torch.BoolTensor) -> torch.Tensor:
            return history_action_counts(history_ids, history_actions, history, candidate_ids, user_index, A, match)

        def recency(match: torch.BoolTensor) -> torch.Tensor:
            return history_action_recency(
                history_ids, history_actions, history_timestamps, history, request_timestamps, candidate_ids, user_index, A, match
            )

        parts = []
        if config.ctr_history_count_features or config.ctr_history_recency_features:
            match = candidate_history_matches(history_ids, history, candidate_ids, user_index)  # (N, T), gathered once
            parts += [counts(match)] if config.ctr_history_count_features else []
            parts += [recency(match)] if config.ctr_history_recency_features else []
        if config.ctr_history_field_match_features:
            # Per field, only the candidate-matched half of each feature: the per-user half does not depend on it.
            history_fields = self.ctr_item_features(history_ids)  # (U, T, S): the item fields' slots, side by side
            for side_start, column, width in self.item_field_columns:
                match = history_field_matches(
                    history_fields[..., column : column + width], history,
                    candidate_side_feature_ids[:, side_start : side_start + width], user_index,
                )
                parts.append(counts(match)[:, A:])
                if config.ctr_history_recency_features:
                    parts.append(recency(match)[:, A:])
        return torch.cat(parts, dim=-1)

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
        history_counts: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Head logits `(N,)` from the candidate's encoder output (early fusion) or user + candidate (late fusion), the
        side features and the history features the config asks for (`history_counts`, from [`history_counts`]).
        """
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
        if any(getattr(self.config, name) for name in HISTORY_FEATURE_FIELDS):
            if history_counts is None:
                raise ValueError("`history_counts` are required: this model was configured with history features.")
            parts.append(history_counts.to(parts[0].dtype))
        logits = self.ctr_head(torch.cat(parts, dim=-1))
        if self.ctr_item_bias is not None:
            logits = logits + self.ctr_item_bias(candidate_ids)
        return logits.float()

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
        deduplicate_histories: bool = False,
        candidate_age: Optional[torch.LongTensor] = None,
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
        if checking_inputs() and not valid.any(dim=1).all():
            row = int((~valid.any(dim=1)).nonzero()[0])
            raise ValueError(f"Row {row} has no real token: each row needs its candidate as its last real token.")
        rows = torch.arange(B, device=input_ids.device)
        candidate_index = last_valid_index(valid)
        history = valid.clone()
        history[rows, candidate_index] = False
        candidate_ids = input_ids[rows, candidate_index]

        if deduplicate_histories:
            if output_hidden_states or output_attentions:
                raise ValueError("`deduplicate_histories=True` returns no per-layer hidden states or attentions.")
            scored = self.dcat(
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
            hidden = outputs.last_hidden_state
            candidate_hidden = hidden[rows, candidate_index]  # (B, H)
            has_history = history.any(dim=1, keepdim=True).to(hidden.dtype)
            user_embedding = hidden[rows, last_valid_index(history)] * has_history  # (B, H)
            # Pretraining losses see history events only: the candidate's outcome is the label, not a target.
            history_counts = self.history_counts(
                input_ids, action_ids, history, candidate_ids, rows, timestamps,
                timestamps[rows, candidate_index] if timestamps is not None else None, side_feature_ids,
            )
            scored = PinFMDCATOutput(
                logits=self.ranking_logits(
                    candidate_hidden, user_embedding, candidate_ids, side_feature_ids, candidate_age, history_counts
                ),
                candidate_hidden_state=candidate_hidden, user_embedding=user_embedding, context_hidden_state=hidden,
                context_input_ids=input_ids, context_attention_mask=history,
            )
            hidden_states, attentions = outputs.hidden_states, outputs.attentions

        loss = ctr_loss = aux_loss = None
        if labels is not None:
            ctr_loss = F.binary_cross_entropy_with_logits(scored.logits, labels.to(scored.logits.dtype).view(-1))
            loss = ctr_loss
            if self.next_item_head is not None:
                aux_loss = self.auxiliary_loss(scored)
                loss = ctr_loss + self.config.ctr_aux_loss_weight * aux_loss
        return PinFMForCTROutput(
            loss=loss,
            logits=scored.logits,
            ctr_loss=ctr_loss,
            aux_loss=aux_loss,
            candidate_hidden_state=scored.candidate_hidden_state,
            user_embedding=scored.user_embedding,
            hidden_states=hidden_states,
            attentions=attentions,
        )

    def auxiliary_loss(self, scored: PinFMDCATOutput) -> torch.Tensor:
        """The next-item head's weighted `objective` losses on the history events of the context pass."""
        query = self.next_item_head.query(scored.context_hidden_state)
        history = scored.context_attention_mask
        labels = scored.context_input_ids.masked_fill(~history, -100)
        losses = self.next_item_head.losses(
            query, labels, history.long(), self.pinfm.embeddings.item_embeddings, self.objective
        )
        return self.objective.weighted_sum(losses)

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
        elif candidate_user_index.numel() and checking_inputs():
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
        scored = self.dcat(
            input_ids, attention_mask, action_ids, surface_ids, timestamps,
            candidate_ids=flat, candidate_user_index=candidate_user_index, request_timestamps=request_timestamps,
            candidate_side_feature_ids=side, candidate_surface_ids=surfaces, deduplicate=deduplicate,
            candidates_per_user=shape[1] if candidate_ids.dim() == 2 else None, keep_context_hidden_states=False,
        )
        return scored.logits.view(shape)

    def dcat(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        action_ids: Optional[torch.LongTensor],
        surface_ids: Optional[torch.LongTensor],
        timestamps: Optional[torch.LongTensor],
        *,
        candidate_ids: torch.LongTensor,
        candidate_user_index: torch.LongTensor,
        request_timestamps: Optional[torch.LongTensor] = None,
        candidate_side_feature_ids: Optional[torch.LongTensor] = None,
        candidate_surface_ids: Optional[torch.LongTensor] = None,
        candidate_age: Optional[torch.LongTensor] = None,
        deduplicate: bool = True,
        candidates_per_user: Optional[int] = None,
        keep_context_hidden_states: bool = True,
    ) -> PinFMDCATOutput:
        """
        DCAT scoring of `N` flat candidates `(N,)`, the user row of each in `candidate_user_index` `(N,)`, against the
        histories `(num_users, sequence_length)` (no candidate token): one context pass per distinct history (with
        `deduplicate`) caches every layer's keys and values, then one crossing pass runs all candidates.
        `candidates_per_user` says that every user has that many candidates, in user order (a flattened
        `(num_users, C)` grid), which the crossing pass then uses as it is. Without `keep_context_hidden_states`
        (scoring only) the context pass runs its last layer at each user's last event alone, and
        `context_hidden_state` is None.
        """
        valid = attention_mask.bool()
        if request_timestamps is None and timestamps is not None:
            request_timestamps = timestamps.masked_fill(~valid, torch.iinfo(timestamps.dtype).min).amax(dim=1)
        # Padding positions never matter: zero them so identical histories compare equal whatever they hold there.
        events = {"input_ids": input_ids, "action_ids": action_ids, "surface_ids": surface_ids, "timestamps": timestamps}
        events = {k: (v * valid) if v is not None else None for k, v in events.items()}
        user_index = candidate_user_index
        first = None
        if deduplicate and input_ids.shape[0] > 1:  # one user has nothing to share
            first, inverse = unique_rows([*(v for v in events.values() if v is not None), valid.long()], request_timestamps)
        if first is not None and first.numel() < input_ids.shape[0]:  # only if rows merge: else keep the users' order
            candidates_per_user = None  # merged users' candidates no longer form a grid
            events = {k: v[first] if v is not None else None for k, v in events.items()}
            valid = valid[first]
            request_timestamps = request_timestamps[first] if request_timestamps is not None else None
            user_index = inverse[candidate_user_index]

        # Context pass: once per distinct user, caching each layer's keys and values.
        context = self.pinfm(
            events["input_ids"], attention_mask=valid.long(), action_ids=events["action_ids"],
            surface_ids=events["surface_ids"], timestamps=events["timestamps"], end_timestamps=request_timestamps,
            return_key_values=True, user_embedding_only=not keep_context_hidden_states,
        )
        candidate_hidden = self.cross_candidates(
            context.key_values, valid, events["timestamps"], request_timestamps, candidate_ids, user_index,
            candidate_side_feature_ids, candidate_surface_ids, candidates_per_user,
        )
        has_history = valid.any(dim=1, keepdim=True).to(candidate_hidden.dtype)
        user_embedding = (context.user_embedding * has_history)[user_index]
        history_counts = self.history_counts(
            events["input_ids"], events["action_ids"], valid, candidate_ids, user_index, events["timestamps"],
            request_timestamps, candidate_side_feature_ids,
        )
        return PinFMDCATOutput(
            logits=self.ranking_logits(
                candidate_hidden, user_embedding, candidate_ids, candidate_side_feature_ids, candidate_age, history_counts
            ),
            candidate_hidden_state=candidate_hidden,
            user_embedding=user_embedding,
            context_hidden_state=context.last_hidden_state if keep_context_hidden_states else None,
            context_input_ids=events["input_ids"],
            context_attention_mask=valid,
        )

    def cross_candidates(
        self,
        key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...],
        valid: torch.BoolTensor,
        timestamps: Optional[torch.LongTensor],
        request_timestamps: Optional[torch.LongTensor],
        candidate_ids: torch.LongTensor,
        user_index: torch.LongTensor,
        candidate_side_feature_ids: Optional[torch.LongTensor],
        candidate_surface_ids: Optional[torch.LongTensor],
        candidates_per_user: Optional[int] = None,
    ) -> torch.Tensor:
        """
        The crossing pass: candidates `(N,)` of users `user_index` `(N,)`, laid out as a `(users, slots)` grid, each
        attending to its user's cached `key_values` (real events `valid` `(U, T)`) and to itself. Returns `(N, hidden)`.
        With `candidates_per_user` the candidates already are that grid, row by row (`N = U * C`): no layout to build.
        """
        config, device = self.config, candidate_ids.device
        num_users = valid.shape[0]
        num_events = valid.sum(dim=1)  # (U,)
        if candidates_per_user is None:
            order = torch.argsort(user_index, stable=True)
            counts = torch.bincount(user_index, minlength=num_users)
            starts = counts.cumsum(0) - counts
            sorted_users = user_index[order]
            slots = torch.arange(order.numel(), device=device) - starts[sorted_users]
            width = int(counts.max())
        else:
            width = candidates_per_user

        def to_grid(values: torch.Tensor) -> torch.Tensor:
            """`(N, ...)` per-candidate values -> `(U, width, ...)`, zeros (padding) in the empty slots."""
            if candidates_per_user is not None:
                return values.view(num_users, width, *values.shape[1:])
            grid = values.new_zeros((num_users, width, *values.shape[1:]))
            grid[sorted_users, slots] = values[order]
            return grid

        grid_ids = to_grid(candidate_ids)
        # Every candidate has the candidate action: one id, broadcast over the grid rather than looked up N times.
        grid_actions = torch.full((1, 1), config.candidate_action_id, dtype=torch.long, device=device)
        grid_surfaces = to_grid(candidate_surface_ids) if candidate_surface_ids is not None else None
        time_embeddings = None
        if config.use_time_features:
            if timestamps is None:
                raise ValueError("`timestamps` are required: this model was configured with `use_time_features=True`.")
            last_event = timestamps.masked_fill(~valid, torch.iinfo(timestamps.dtype).min).amax(dim=1)
            # One gap per user, shared by its candidates: (U, 1) features broadcast over the grid.
            gap = (request_timestamps - last_event).clamp(min=0).view(-1, 1)
            has_previous = (num_events > 0).view(-1, 1)
            time_embeddings = self.pinfm.embeddings.candidate_time_features(gap, has_previous)  # (U, 1, H)
        candidate_embeddings = self.pinfm.embeddings.combine(grid_ids, grid_actions, grid_surfaces, time_embeddings)
        candidate_features = self.candidate_feature_embeddings(candidate_side_feature_ids)
        if candidate_features is not None:
            candidate_embeddings = candidate_embeddings + to_grid(candidate_features.to(candidate_embeddings.dtype))
        # A history without padding needs no attention mask (the common serving case); tracing keeps the mask.
        past_valid = None if checking_inputs() and bool(valid.all()) else valid
        crossed = self.pinfm.encode_candidates(candidate_embeddings, num_events, key_values, past_valid)  # (U, C, H)
        if candidates_per_user is not None:
            return crossed.reshape(num_users * width, crossed.shape[-1])
        candidate_hidden = torch.empty(order.numel(), crossed.shape[-1], dtype=crossed.dtype, device=device)
        candidate_hidden[order] = crossed[sorted_users, slots]
        return candidate_hidden


def randomize_candidate_ids(
    input_ids: torch.LongTensor, attention_mask: torch.Tensor, *, fraction: float, first_bucket_id: int, num_buckets: int
) -> torch.LongTensor:
    """
    Cold start (PinFM): replace a `fraction` of the candidates' ids (each row's last real token) by random hash-bucket
    ids, so the ranker learns to score an item it knows nothing about, as it must for fresh items. Training only;
    draws from torch's global generator (seeded per step by the recipes, so resumes repeat it).
    """
    if fraction <= 0:
        return input_ids
    if num_buckets <= 0:
        raise ValueError("Candidate-id randomisation needs hash buckets: build the tokenizer with `num_hash_buckets > 0`.")
    B = input_ids.shape[0]
    last = last_valid_index(attention_mask)
    rows = torch.arange(B, device=input_ids.device)
    replace = torch.rand(B, device=input_ids.device) < fraction
    buckets = torch.randint(first_bucket_id, first_bucket_id + num_buckets, (B,), device=input_ids.device)
    out = input_ids.clone()
    out[rows[replace], last[replace]] = buckets[replace]
    return out


def unique_rows(columns: list[torch.Tensor], request_timestamps: Optional[torch.Tensor]) -> tuple[torch.LongTensor, torch.LongTensor]:
    """
    Distinct rows of the `(B, ...)` columns (plus the request time): `(first, inverse)` where `first` `(U,)` is the
    first row of each distinct one and `inverse` `(B,)` maps every row to its distinct one.
    """
    keys = [c.reshape(c.shape[0], -1) for c in columns]
    if request_timestamps is not None:
        keys.append(request_timestamps.view(-1, 1))
    _, inverse = torch.unique(torch.cat(keys, dim=1), dim=0, return_inverse=True)
    num_rows = inverse.shape[0]
    first = torch.full((int(inverse.max()) + 1,), num_rows, device=inverse.device, dtype=torch.long)
    return first.scatter_reduce(0, inverse, torch.arange(num_rows, device=inverse.device), reduce="amin"), inverse


__all__ = ["PinFMDCATOutput", "PinFMForCTR", "PinFMForCTROutput", "randomize_candidate_ids"]
