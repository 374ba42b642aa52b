"""PinFM model configuration."""

from typing import Optional, Sequence

from transformers import PretrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)

_LOSS_NAMES = ("next_token", "multi_token", "future_token")


class PinFMConfig(PretrainedConfig):
    r"""
    Configuration of a [`PinFMModel`]: a LLaMA-style causal transformer over user activity sequences
    (GPSD), whose per-event input is item + action (+ surface) + time features (PinFM).

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
        next_token_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the next-token loss (predict event `i + 1` from position `i`).
        multi_token_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of the multi-token loss (every positive event in the next `multi_token_window` events
            from position `i`).
        future_token_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of the future-token loss (from the last position of a `future_token_input_length` window,
            every positive in the `multi_token_window` events after it).
        multi_token_window (`int`, *optional*, defaults to 8):
            Number of future events `L'` the multi-token and future-token losses look at.
        future_token_input_length (`int`, *optional*, defaults to 16):
            Length `L_d` of the input window of the future-token loss.
        positive_action_ids (`Sequence[int]`, *optional*):
            Action ids whose events count as positive targets; `None` or empty means every event.
        num_negatives (`int`, *optional*, defaults to 512):
            Number of negatives sampled from the vocabulary per batch (shared across the batch).
        negative_sampling (`str`, *optional*, defaults to `"uniform"`):
            `"uniform"` or `"popularity"` (needs `item_counts` to be set on the model).
        use_in_batch_negatives (`bool`, *optional*, defaults to `True`):
            Also use the batch's positive items as negatives (a random subset of at most `num_negatives` distinct ones).
        use_log_q_correction (`bool`, *optional*, defaults to `True`):
            Subtract the log sampling probability of each candidate from its logit (sampled-softmax bias
            correction).
        full_softmax (`bool`, *optional*, defaults to `False`):
            Score against the whole item vocabulary instead of sampling (exact; for small vocabularies).
        projection_size (`int`, *optional*):
            Width of the L2-normalised scoring projections; defaults to `hidden_size`.
        initial_temperature (`float`, *optional*, defaults to 0.05):
            Initial value of the learnable softmax temperature of the scoring head.
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
            Weight of the auxiliary pretraining (next-token etc.) loss on the history during fine-tuning, which
            PinFM keeps to stop the sequence representation from drifting.
        ctr_candidate_item_features (`bool`, *optional*, defaults to `False`):
            Cold start: add the candidate's item side features (`ctr_item_feature_fields`, e.g. genre, category) to
            its token embedding, so a fresh item (a hash-bucket id) is not a blank to the sequence model.
        ctr_item_feature_fields (`list[int]`, *optional*):
            Indices (into `ctr_feature_slots`) of the side-feature fields that describe the item.
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
        next_token_loss_weight: float = 1.0,
        multi_token_loss_weight: float = 0.0,
        future_token_loss_weight: float = 0.0,
        multi_token_window: int = 8,
        future_token_input_length: int = 16,
        positive_action_ids: Optional[Sequence[int]] = None,
        num_negatives: int = 512,
        negative_sampling: str = "uniform",
        use_in_batch_negatives: bool = True,
        use_log_q_correction: bool = True,
        full_softmax: bool = False,
        projection_size: Optional[int] = None,
        initial_temperature: float = 0.05,
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
        ctr_young_item_dropout: float = 0.0,
        ctr_young_item_age_days: float = 7.0,
        pretraining_max_timestamp: Optional[int] = None,
        **kwargs,
    ):
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({hidden_size}) must be divisible by `num_attention_heads` ({num_attention_heads})."
            )
        if (hidden_size // num_attention_heads) % 2 != 0:
            raise ValueError(
                f"The head size `hidden_size / num_attention_heads` ({hidden_size // num_attention_heads}) must be "
                "even for rotary embeddings."
            )
        if num_item_hash_tables < 0 or (num_item_hash_tables and hidden_size % num_item_hash_tables != 0):
            raise ValueError(
                f"`hidden_size` ({hidden_size}) must be divisible by `num_item_hash_tables` ({num_item_hash_tables})."
            )
        if item_embedding_quantization not in (None, "int8", "int4"):
            raise ValueError(
                f"`item_embedding_quantization` must be None, 'int8' or 'int4', got {item_embedding_quantization!r}."
            )
        item_table_width = hidden_size // num_item_hash_tables if num_item_hash_tables else hidden_size
        if item_embedding_quantization == "int4" and item_table_width % 2 != 0:
            raise ValueError(
                f"`item_embedding_quantization='int4'` packs two values per byte: the item table width ({item_table_width}: "
                "`hidden_size / num_item_hash_tables`) must be even."
            )
        if item_vocab_size <= num_special_item_tokens:
            raise ValueError(
                f"`item_vocab_size` ({item_vocab_size}) must exceed `num_special_item_tokens` "
                f"({num_special_item_tokens})."
            )
        if negative_sampling not in ("uniform", "popularity"):
            raise ValueError(f"`negative_sampling` must be 'uniform' or 'popularity', got {negative_sampling!r}.")
        for name, weight in zip(_LOSS_NAMES, (next_token_loss_weight, multi_token_loss_weight, future_token_loss_weight)):
            if weight < 0:
                raise ValueError(f"`{name}_loss_weight` ({weight}) must be >= 0.")
        if num_time_buckets < 2:
            raise ValueError(f"`num_time_buckets` ({num_time_buckets}) must be >= 2.")
        if ctr_fusion not in ("early", "late"):
            raise ValueError(f"`ctr_fusion` must be 'early' or 'late', got {ctr_fusion!r}.")
        if ctr_head not in ("mlp", "dcn"):
            raise ValueError(f"`ctr_head` must be 'mlp' or 'dcn', got {ctr_head!r}.")
        if bool(ctr_feature_vocab_size) != bool(ctr_feature_slots):
            raise ValueError(
                f"`ctr_feature_vocab_size` ({ctr_feature_vocab_size}) and `ctr_feature_slots` ({ctr_feature_slots}) "
                "must be given together (side features) or both left empty."
            )
        if ctr_candidate_item_features and not ctr_item_feature_fields:
            raise ValueError("`ctr_candidate_item_features=True` needs `ctr_item_feature_fields` (which fields are item features).")
        if ctr_item_feature_fields and any(not 0 <= f < len(ctr_feature_slots or []) for f in ctr_item_feature_fields):
            raise ValueError(
                f"`ctr_item_feature_fields` ({list(ctr_item_feature_fields)}) must index `ctr_feature_slots` "
                f"({list(ctr_feature_slots or [])})."
            )
        if not 0.0 <= ctr_young_item_dropout < 1.0:
            raise ValueError(f"`ctr_young_item_dropout` ({ctr_young_item_dropout}) must be in [0, 1).")
        if ctr_young_item_age_days <= 0:
            raise ValueError(f"`ctr_young_item_age_days` ({ctr_young_item_age_days}) must be positive.")
        if ctr_aux_loss_weight < 0:
            raise ValueError(f"`ctr_aux_loss_weight` ({ctr_aux_loss_weight}) must be >= 0.")

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
        self.next_token_loss_weight = next_token_loss_weight
        self.multi_token_loss_weight = multi_token_loss_weight
        self.future_token_loss_weight = future_token_loss_weight
        self.multi_token_window = multi_token_window
        self.future_token_input_length = future_token_input_length
        self.positive_action_ids = list(positive_action_ids) if positive_action_ids else None
        self.num_negatives = num_negatives
        self.negative_sampling = negative_sampling
        self.use_in_batch_negatives = use_in_batch_negatives
        self.use_log_q_correction = use_log_q_correction
        self.full_softmax = full_softmax
        self.projection_size = projection_size if projection_size is not None else hidden_size
        self.initial_temperature = initial_temperature
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
        self.ctr_young_item_dropout = ctr_young_item_dropout
        self.ctr_young_item_age_days = ctr_young_item_age_days
        self.pretraining_max_timestamp = pretraining_max_timestamp
        super().__init__(pad_token_id=pad_token_id, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


__all__ = ["PinFMConfig"]
