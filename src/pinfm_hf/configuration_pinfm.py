"""PinFM model configuration."""

from typing import Any, Optional, Sequence

from transformers import PretrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Training fields of configs saved before they moved to `PretrainingObjective` (recipe arguments): dropped on load.
LEGACY_TRAINING_FIELDS = (
    "next_token_loss_weight", "multi_token_loss_weight", "future_token_loss_weight", "multi_token_window",
    "future_token_input_length", "positive_action_ids", "num_negatives", "negative_sampling", "use_in_batch_negatives",
    "use_log_q_correction", "full_softmax", "initial_temperature",
)


_RANGES = {
    "positive": (lambda v: v > 0, "positive"),
    "non_negative": (lambda v: v >= 0, ">= 0"),
    "fraction": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "at_least_two": (lambda v: v >= 2, ">= 2"),
}
# Each field's own constraint: a range name, or a tuple of the allowed values.
_FIELD_RULES = {
    "item_vocab_size": "positive", "action_vocab_size": "positive", "surface_vocab_size": "non_negative",
    "hidden_size": "positive", "num_hidden_layers": "positive", "num_attention_heads": "positive",
    "intermediate_size": "positive", "max_position_embeddings": "positive", "rope_theta": "positive",
    "rms_norm_eps": "positive", "hidden_dropout_prob": "fraction", "attention_dropout": "fraction",
    "initializer_range": "positive", "num_time_buckets": "at_least_two", "num_item_hash_tables": "non_negative",
    "item_hash_table_size": "positive", "item_embedding_quantization": (None, "int8", "int4"),
    "projection_size": "positive", "ctr_fusion": ("early", "late"), "ctr_head": ("mlp", "dcn"),
    "ctr_head_hidden_sizes": "positive", "ctr_num_cross_layers": "positive", "ctr_dropout": "fraction",
    "ctr_feature_vocab_size": "non_negative", "ctr_feature_embedding_size": "positive",
    "ctr_aux_loss_weight": "non_negative", "ctr_young_item_dropout": "fraction", "ctr_young_item_age_days": "positive",
}
_OPTIONAL_FIELDS = ("intermediate_size", "projection_size", "ctr_head_hidden_sizes")


class PinFMConfig(PretrainedConfig):
    r"""
    Configuration of a [`PinFMModel`]: a LLaMA-style causal transformer over user activity sequences
    (GPSD), whose per-event input is item + action (+ surface) + time features (PinFM).

    It holds what is needed to rebuild the model, nothing about how it was trained: the pretraining losses, negatives
    and the initial temperature are a [`~pinfm_hf.losses.PretrainingObjective`] (recipe arguments). Configs saved before
    that move still load; their training fields are dropped.

    Args:
        item_vocab_size (`int`, *optional*, defaults to 1024):
            Number of item tokens (special tokens, known items and hash buckets for unseen items), i.e.
            `len(tokenizer)`.
        action_vocab_size (`int`, *optional*, defaults to 8):
            Number of action tokens (padding and the candidate marker included).
        surface_vocab_size (`int`, *optional*, defaults to 0):
            Number of surface tokens; 0 means the data has no surface and no surface embedding is built.
        hidden_size (`int`, *optional*, defaults to 64):
            Width of the event embeddings and of the transformer.
        num_hidden_layers (`int`, *optional*, defaults to 2):
            Number of transformer layers.
        num_attention_heads (`int`, *optional*, defaults to 2):
            Number of attention heads; must divide `hidden_size`.
        intermediate_size (`int`, *optional*):
            Width of the SwiGLU feed-forward block; defaults to `4 * hidden_size`.
        max_position_embeddings (`int`, *optional*, defaults to 256):
            Longest sequence (in events) the model is meant to see; sequences are truncated to their most
            recent events by the tokenizer/collator.
        rope_theta (`float`, *optional*, defaults to 10000.0):
            Base of the rotary position embedding.
        use_absolute_position_embeddings (`bool`, *optional*, defaults to `False`):
            Also add a learned embedding of each event's index in the sequence (SASRec, HSTU's SASRec): rotary
            attention sees only relative positions, so this tells a token how many events precede it.
        rms_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the RMSNorm layers.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout on the event embeddings and on each residual branch.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the attention probabilities.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialiser of linear and embedding weights.
        use_action_embeddings (`bool`, *optional*, defaults to `True`):
            Add an action embedding to each event (PinFM); off gives a SASRec-like item-only input.
        use_time_features (`bool`, *optional*, defaults to `True`):
            Add embeddings of the bucketed log time gap to the previous event and to the next one (the last event: to
            the request time), which keeps them causal.
        num_time_buckets (`int`, *optional*, defaults to 64):
            Number of log-scaled time-gap buckets; bucket `b` covers gaps of about `2**(b / 2)` seconds.
        use_input_mlp (`bool`, *optional*, defaults to `True`):
            Pass the summed event embedding through a small SwiGLU MLP before the transformer (PinFM).
        num_item_hash_tables (`int`, *optional*, defaults to 0):
            0 keeps one item embedding table of `item_vocab_size` rows. `k > 0` replaces it with `k` hashed
            tables of `item_hash_table_size` rows each, whose `hidden_size / k` wide lookups are
            concatenated (PinFM), so vocabularies far larger than one memory-friendly table fit.
        item_hash_table_size (`int`, *optional*, defaults to 100003):
            Rows per hashed item table (a prime spreads the modulo hash best).
        item_embedding_quantization (`str`, *optional*):
            Row-wise quantisation of the item embedding table(s) for serving: `"int8"` or `"int4"` (per-row scale and
            bias); `None` keeps float tables. Set by [`~PinFMPreTrainedModel.quantize_item_embeddings`]; a quantised
            model cannot be trained.
        pad_token_id (`int`, *optional*, defaults to 0):
            Padding id shared by the item, action and surface vocabularies.
        candidate_action_id (`int`, *optional*, defaults to 1):
            Action id that marks an appended candidate item in early fusion (CTR, serving).
        num_special_item_tokens (`int`, *optional*, defaults to 4):
            Item ids below this are special tokens (padding, unknown, mask, candidate) and are never scored as
            items.
        projection_size (`int`, *optional*):
            Width of the L2-normalised scoring projections; defaults to `hidden_size`.
        ctr_fusion (`str`, *optional*, defaults to `"early"`):
            How [`PinFMForCTR`] fuses the candidate with the user's sequence: `"early"` appends it as the last token
            (candidate action marker) and scores its output position, as PinFM and GPSD do; `"late"` combines the
            user embedding (output before the candidate) with the candidate's item embedding.
        ctr_head (`str`, *optional*, defaults to `"mlp"`):
            Ranking head of [`PinFMForCTR`]: `"mlp"` or `"dcn"` (DCN-v2 cross layers before the MLP).
        ctr_head_hidden_sizes (`list[int]`, *optional*, defaults to `[128, 64]`):
            Hidden layer widths of the ranking MLP.
        ctr_num_cross_layers (`int`, *optional*, defaults to 2):
            Number of cross layers when `ctr_head="dcn"`.
        ctr_dropout (`float`, *optional*, defaults to 0.1):
            Dropout inside the ranking head.
        ctr_feature_vocab_size (`int`, *optional*, defaults to 0):
            Size of the side-feature vocabulary (`CTRFeatureEncoder.vocab_size`); 0 means no side features.
        ctr_feature_slots (`list[int]`, *optional*):
            Slots per side-feature field, in the order of `side_feature_ids` columns; each field is mean-pooled.
        ctr_feature_embedding_size (`int`, *optional*, defaults to 16):
            Width of each side-feature embedding.
        ctr_aux_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of the auxiliary next-item loss on the history during fine-tuning, which PinFM keeps to stop the
            sequence representation from drifting. Positive values give the ranker a next-item head of its own
            (`next_item_head`); the loss follows the model's `objective` ([`PretrainingObjective`]).
        ctr_candidate_item_features (`bool`, *optional*, defaults to `False`):
            Cold start: add the candidate's item side features (`ctr_item_feature_fields`, e.g. genre, category) to
            its token embedding, so a fresh item (a hash-bucket id) is not a blank to the sequence model.
        ctr_item_feature_fields (`list[int]`, *optional*):
            Indices (into `ctr_feature_slots`) of the side-feature fields that describe the item.
        ctr_item_bias (`bool`, *optional*, defaults to `False`):
            Add a learnt per-item scalar to the ranking logit (zero at start). It lets a ranker whose item embeddings
            are frozen (LoRA, frozen backbone, sparse freeze) learn how often each item is liked, which next-item
            pretraining does not encode: one float per item id, trained with the head and saved with a LoRA adapter.
        ctr_history_count_features (`bool`, *optional*, defaults to `False`):
            Give the ranking head, per action, `log1p` of how many events of the user's history have it, and of how
            many of those are on the candidate item ("viewed twice, carted once"). Exact id matches and the user's own
            action mix are what carts, purchases and high ratings follow most; attention over pretrained embeddings
            only approximates them, and a frozen or LoRA-adapted encoder may not surface them. Target-aware counts are
            standard inputs of CTR models (DIN, gradient-boosted rankers). `2 * action_vocab_size` inputs, no weights.
        ctr_history_recency_features (`bool`, *optional*, defaults to `False`):
            Give the ranking head, per action, `log1p` of the seconds from the user's latest history event with it to
            the impression, and from the latest of those on the candidate item (0 where there is none; the counts
            above tell). A causal encoder sees the gaps between events, never an event's age at the impression, which
            is what "came back to it an hour later" rests on (gradient-boosted rankers rank it first on Taobao).
            `2 * action_vocab_size` inputs, no weights; needs timestamps.
        ctr_history_field_match_features (`bool`, *optional*, defaults to `False`):
            The same history features at the level of each item field (`ctr_item_feature_fields`, e.g. genre,
            category) rather than the exact item: per field and action, `log1p` of how many history events share a
            value of that field with the candidate ("carted twice in this category"), and with
            `ctr_history_recency_features` the age of the latest of them. On Taobao and ML-1M, category- and
            genre-level history rates are the gradient-boosted peer's strongest features: most candidates were never
            seen by the user, but their category often was. The model holds each known item's field values
            (`ctr_item_features.item_feature_ids`, filled from the data with `set_item_features`) so history events
            need no side features of their own. `len(ctr_item_feature_fields) * action_vocab_size` inputs (twice
            that with recency), no weights.
        ctr_young_item_dropout (`float`, *optional*, defaults to 0.0):
            Cold start (PinFM): during training, drop the sequence model's output for a candidate with this
            probability when the item is brand new, decaying linearly to 0 at `ctr_young_item_age_days`, so the head
            also learns to rank from side features, as it must for fresh items.
        ctr_young_item_age_days (`float`, *optional*, defaults to 7.0):
            Item age (days since its first event) from which the young-item dropout is off.
        pretraining_max_timestamp (`int`, *optional*):
            Latest event time (unix seconds) in the pretraining data, recorded by the pretraining recipe. Fine-tuning
            refuses a CTR test period that starts before it, as those test events would have leaked into pretraining.

    Examples:

    ```python
    >>> from pinfm_hf import PinFMConfig, PinFMModel
    >>> config = PinFMConfig(item_vocab_size=1000, hidden_size=64, num_hidden_layers=2)
    >>> model = PinFMModel(config)
    >>> model.config.num_attention_heads
    2
    ```"""

    model_type = "pinfm"

    def __init__(
        self,
        item_vocab_size: int = 1024,
        action_vocab_size: int = 8,
        surface_vocab_size: int = 0,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 2,
        intermediate_size: Optional[int] = None,
        max_position_embeddings: int = 256,
        rope_theta: float = 10000.0,
        use_absolute_position_embeddings: bool = False,
        rms_norm_eps: float = 1e-6,
        hidden_dropout_prob: float = 0.1,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        use_action_embeddings: bool = True,
        use_time_features: bool = True,
        num_time_buckets: int = 64,
        use_input_mlp: bool = True,
        num_item_hash_tables: int = 0,
        item_hash_table_size: int = 100003,
        item_embedding_quantization: Optional[str] = None,
        pad_token_id: int = 0,
        candidate_action_id: int = 1,
        num_special_item_tokens: int = 4,
        projection_size: Optional[int] = None,
        ctr_fusion: str = "early",
        ctr_head: str = "mlp",
        ctr_head_hidden_sizes: Optional[Sequence[int]] = None,
        ctr_num_cross_layers: int = 2,
        ctr_dropout: float = 0.1,
        ctr_feature_vocab_size: int = 0,
        ctr_feature_slots: Optional[Sequence[int]] = None,
        ctr_feature_embedding_size: int = 16,
        ctr_aux_loss_weight: float = 0.0,
        ctr_candidate_item_features: bool = False,
        ctr_item_feature_fields: Optional[Sequence[int]] = None,
        ctr_item_bias: bool = False,
        ctr_history_count_features: bool = False,
        ctr_history_recency_features: bool = False,
        ctr_history_field_match_features: bool = False,
        ctr_young_item_dropout: float = 0.0,
        ctr_young_item_age_days: float = 7.0,
        pretraining_max_timestamp: Optional[int] = None,
        **kwargs,
    ):
        dropped = [name for name in LEGACY_TRAINING_FIELDS if kwargs.pop(name, None) is not None]
        if dropped:
            logger.warning(
                f"PinFMConfig: ignoring training field(s) {dropped} (a config saved by an older version?): the losses, "
                "negatives and initial temperature are a `PretrainingObjective` now (`model.objective`, recipe flags)."
            )
        arguments = locals()
        for name in _FIELD_RULES:
            self.check_field(name, arguments[name])
        self.item_vocab_size = item_vocab_size
        self.action_vocab_size = action_vocab_size
        self.surface_vocab_size = surface_vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size if intermediate_size is not None else 4 * hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.use_absolute_position_embeddings = use_absolute_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.use_action_embeddings = use_action_embeddings
        self.use_time_features = use_time_features
        self.num_time_buckets = num_time_buckets
        self.use_input_mlp = use_input_mlp
        self.num_item_hash_tables = num_item_hash_tables
        self.item_hash_table_size = item_hash_table_size
        self.item_embedding_quantization = item_embedding_quantization
        self.candidate_action_id = candidate_action_id
        self.num_special_item_tokens = num_special_item_tokens
        self.projection_size = projection_size if projection_size is not None else hidden_size
        self.ctr_fusion = ctr_fusion
        self.ctr_head = ctr_head
        self.ctr_head_hidden_sizes = list(ctr_head_hidden_sizes) if ctr_head_hidden_sizes is not None else [128, 64]
        self.ctr_num_cross_layers = ctr_num_cross_layers
        self.ctr_dropout = ctr_dropout
        self.ctr_feature_vocab_size = ctr_feature_vocab_size
        self.ctr_feature_slots = list(ctr_feature_slots) if ctr_feature_slots else []
        self.ctr_feature_embedding_size = ctr_feature_embedding_size
        self.ctr_aux_loss_weight = ctr_aux_loss_weight
        self.ctr_candidate_item_features = ctr_candidate_item_features
        self.ctr_item_feature_fields = list(ctr_item_feature_fields) if ctr_item_feature_fields else []
        self.ctr_item_bias = ctr_item_bias
        self.ctr_history_count_features = ctr_history_count_features
        self.ctr_history_recency_features = ctr_history_recency_features
        self.ctr_history_field_match_features = ctr_history_field_match_features
        self.ctr_young_item_dropout = ctr_young_item_dropout
        self.ctr_young_item_age_days = ctr_young_item_age_days
        self.pretraining_max_timestamp = pretraining_max_timestamp
        self._check_combinations()
        super().__init__(pad_token_id=pad_token_id, **kwargs)

    def _check_combinations(self) -> None:
        """The checks that need several fields (each field's own range: `check_field`)."""
        hidden_size, num_attention_heads, num_item_hash_tables = self.hidden_size, self.num_attention_heads, self.num_item_hash_tables
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({hidden_size}) must be divisible by `num_attention_heads` ({num_attention_heads})."
            )
        if (hidden_size // num_attention_heads) % 2 != 0:
            raise ValueError(
                f"The head size `hidden_size / num_attention_heads` ({hidden_size // num_attention_heads}) must be "
                "even for rotary embeddings."
            )
        if num_item_hash_tables and hidden_size % num_item_hash_tables != 0:
            raise ValueError(
                f"`hidden_size` ({hidden_size}) must be divisible by `num_item_hash_tables` ({num_item_hash_tables})."
            )
        item_table_width = hidden_size // num_item_hash_tables if num_item_hash_tables else hidden_size
        if self.item_embedding_quantization == "int4" and item_table_width % 2 != 0:
            raise ValueError(
                f"`item_embedding_quantization='int4'` packs two values per byte: the item table width ({item_table_width}: "
                "`hidden_size / num_item_hash_tables`) must be even."
            )
        if self.item_vocab_size <= self.num_special_item_tokens:
            raise ValueError(
                f"`item_vocab_size` ({self.item_vocab_size}) must exceed `num_special_item_tokens` "
                f"({self.num_special_item_tokens})."
            )
        slots, fields = self.ctr_feature_slots, self.ctr_item_feature_fields
        if bool(self.ctr_feature_vocab_size) != bool(slots):
            raise ValueError(
                f"`ctr_feature_vocab_size` ({self.ctr_feature_vocab_size}) and `ctr_feature_slots` ({slots or None}) "
                "must be given together (side features) or both left empty."
            )
        if self.ctr_candidate_item_features and not fields:
            raise ValueError("`ctr_candidate_item_features=True` needs `ctr_item_feature_fields` (which fields are item features).")
        if self.ctr_history_field_match_features and not fields:
            raise ValueError("`ctr_history_field_match_features=True` needs `ctr_item_feature_fields` (which fields to match).")
        if fields and any(not 0 <= f < len(slots) for f in fields):
            raise ValueError(f"`ctr_item_feature_fields` ({fields}) must index `ctr_feature_slots` ({slots}).")

    @classmethod
    def check_field(cls, name: str, value: Any) -> None:
        """
        Raise `ValueError` when one field's value is out of its range or choices (checks that need several fields stay
        in `__init__`). Recipe arguments derived from this config call it too, before any data is read.
        """
        rule = _FIELD_RULES.get(name)  # None: a switch, or a field only checked together with others
        if rule is None:
            return
        if isinstance(rule, tuple):
            if value not in rule:
                raise ValueError(f"`{name}` must be one of {list(rule)}, got {value!r}.")
            return
        if value is None and name in _OPTIONAL_FIELDS:
            return
        ok, allowed = _RANGES[rule]
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not ok(item):
                raise ValueError(f"`{name}` ({value!r}) must be {allowed}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


__all__ = ["PinFMConfig"]
