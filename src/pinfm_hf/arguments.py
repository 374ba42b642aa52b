"""The recipes' arguments: dataclasses that `HfArgumentParser` turns into flags (YAML defaults, then CLI overrides).

Every field is written once. Model fields are derived from [`PinFMConfig`]'s own signature, defaults and docstring
(`config_arguments`), and checked with its per-field rules as they are parsed; the pretraining objective is
[`PretrainingObjective`] itself; the run fields both recipes share live in [`TrainingArguments`]. Every numeric flag is
range-checked before any data is read.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .configuration_pinfm import PinFMConfig
from .data import CTR_USE_CASES, DEFAULT_POSITIVE_ACTIONS, EventSourceArguments, use_case_actions
from .training_utils import check_ranges
from .transfer import TRANSFER_STRATEGIES


def _config_help() -> dict[str, str]:
    """Each field's description in `PinFMConfig`'s docstring (transformers' `name (`type`, ...):` layout)."""
    helps, name = {}, None
    for line in (PinFMConfig.__doc__ or "").splitlines():
        match = re.match(r"^ {8}(\w+) \(`", line)
        if match:
            name = match.group(1)
            helps[name] = ""
        elif name and line.startswith(" " * 12):
            helps[name] = (helps[name] + " " + line.strip()).strip()
        elif line.strip():
            name = None
    return helps


def _argument_type(annotation: Any) -> Any:
    """`PinFMConfig` annotations as `HfArgumentParser` reads them (`Sequence[int]` becomes `list[int]`)."""
    if typing.get_origin(annotation) is typing.Union:
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return Optional[_argument_type(inner[0])]
    if typing.get_origin(annotation) in (Sequence, list):
        return list[typing.get_args(annotation)[0]]
    return annotation


def config_arguments(name: str, fields: Sequence[str], *, bases: tuple[type, ...] = (), doc: str = "") -> type:
    """
    A dataclass of `PinFMConfig` fields for a recipe's flags: the config's types, defaults and descriptions, checked
    by `PinFMConfig.check_field` when parsed. A list field whose config default is None gets the config's effective
    default (e.g. `ctr_head_hidden_sizes`).
    """
    signature = inspect.signature(PinFMConfig.__init__)
    helps = _config_help()
    effective = PinFMConfig()
    specs = []
    for field_name in fields:
        parameter = signature.parameters[field_name]
        kind = _argument_type(parameter.annotation)
        metadata = {"help": helps.get(field_name, "")}
        if typing.get_origin(kind) is typing.Union and typing.get_origin(typing.get_args(kind)[0]) is list:
            kind = typing.get_args(kind)[0]
            default = list(getattr(effective, field_name))
            specs.append((field_name, kind, field(default_factory=lambda d=default: list(d), metadata=metadata)))
        else:
            specs.append((field_name, kind, field(default=parameter.default, metadata=metadata)))

    def __post_init__(self) -> None:
        for base in bases:
            if hasattr(base, "__post_init__"):
                base.__post_init__(self)
        for field_name in fields:
            PinFMConfig.check_field(field_name, getattr(self, field_name))

    cls = dataclasses.make_dataclass(name, specs, bases=bases, namespace={"__post_init__": __post_init__})
    cls.__doc__ = doc
    cls.__module__ = __name__
    return cls


# ----- pretraining -----------------------------------------------------------------------------------------------

ENCODER_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "rope_theta",
    "use_absolute_position_embeddings", "rms_norm_eps", "hidden_dropout_prob", "attention_dropout", "initializer_range",
    "use_action_embeddings", "use_time_features", "num_time_buckets", "use_input_mlp", "num_item_hash_tables",
    "item_hash_table_size", "projection_size",
)
ModelArguments = config_arguments(
    "ModelArguments", ENCODER_FIELDS,
    doc="The encoder's architecture: `PinFMConfig` fields (the vocabulary sizes and the length come from the data).",
)


# `--eval_exclude_history auto` drops the history's items from the ranking when fewer events than this repeat one.
MAX_REPEAT_SHARE_TO_EXCLUDE_HISTORY = 0.01


@dataclass
class PretrainingDataArguments(EventSourceArguments):
    """Which events, how they become training sequences and evaluation targets."""

    prepared: Optional[str] = field(
        default=None,
        metadata={"help": "A folder written by recipes/prepare_events.py (a log of any size, prepared on DuckDB or "
                  "Spark), instead of --dataset: encoded once into shards, then streamed (each process its own shards, "
                  "through a shuffle buffer), never held in memory whole."},
    )
    shuffle_buffer_size: int = field(
        default=10_000,
        metadata={"help": "With --prepared: training rows each process holds to shuffle the stream (memory grows with "
                  "it, the randomness of the order too; shards are also read in a random order every epoch)."},
    )
    max_length: int = field(default=200, metadata={"help": "Most recent events per user the model sees."})
    min_item_count: int = field(default=1, metadata={"help": "Items seen fewer times go to hash buckets."})
    max_vocab_size: Optional[int] = field(default=None, metadata={"help": "Keep only the most frequent items."})
    num_hash_buckets: int = field(default=1024, metadata={"help": "Buckets for item ids unseen at tokenizer build."})
    vocabulary_free: bool = field(
        default=False,
        metadata={"help": "PinFM's vocabulary-free mode: no per-item vocabulary at all; every item id is hashed (crc32, "
                  "stable across processes and machines) into --num_hash_buckets ids, which --num_item_hash_tables "
                  "hashed tables of --item_hash_table_size rows embed. Evaluation ranks the items of the data."},
    )
    positive_actions: str = field(
        default="all", metadata={"help": "Comma-separated positive action names, 'all', or 'default' (per data set)."}
    )
    time_cut_quantile: Optional[float] = field(
        default=None,
        metadata={"help": "Pretrain only on events before this global time quantile (e.g. 0.9), so that a CTR test "
                  "period after it (finetune_ctr.py --cut_quantile, same value) never leaks into pretraining."},
    )
    train_windows: bool = field(default=True, metadata={"help": "Train on every max_length chunk of long histories."})
    train_holdout: int = field(
        default=1,
        metadata={"help": "Events held out of training at the end of each sequence: 1 trains on the validation targets "
                  "(HSTU's protocol, so periodic validation is in-sample); 2 keeps them out (out-of-sample validation)."},
    )
    max_eval_users: Optional[int] = field(default=None, metadata={"help": "Evaluate on the first N users only."})
    eval_exclude_history: str = field(
        default="auto",
        metadata={"help": "'true': do not rank the items of the user's input events (HSTU's protocol, for data without "
                  "repeats); 'false': rank every item; 'auto': true when under 1%% of the events repeat an item of "
                  "the user's history.", "choices": ["auto", "true", "false"]},
    )
    max_train_users: Optional[int] = field(default=None, metadata={"help": "Train on the first N users only (tests)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.eval_exclude_history).lower() not in ("auto", "true", "false"):
            raise ValueError(f"--eval_exclude_history must be 'auto', 'true' or 'false', got {self.eval_exclude_history!r}.")
        if self.prepared and self.time_cut_quantile is not None:
            raise ValueError("--prepared data is cut in time when prepared (prepare_events.py --cut_timestamp): "
                             "--time_cut_quantile applies to --dataset only.")
        check_ranges(
            self, positive=("max_length", "min_item_count", "max_vocab_size", "train_holdout", "max_eval_users", "max_train_users",
                      "shuffle_buffer_size"),
            non_negative=("num_hash_buckets",), quantiles=("time_cut_quantile",),
        )

    def resolve_eval_exclude_history(self, repeat_share: float) -> bool:
        """Settle `eval_exclude_history` (True/False/'auto') for data whose events repeat an item at `repeat_share`."""
        value = str(self.eval_exclude_history).lower()
        self.eval_exclude_history = repeat_share < MAX_REPEAT_SHARE_TO_EXCLUDE_HISTORY if value == "auto" else value == "true"
        return self.eval_exclude_history

    def positive_action_names(self, known_actions: Sequence[str]) -> Optional[list[str]]:
        """The actions whose events are pretraining targets (None: every event), checked against `known_actions`."""
        if self.positive_actions == "all":
            return None
        if self.positive_actions == "default":
            if self.dataset not in DEFAULT_POSITIVE_ACTIONS:
                raise ValueError(f"No default positive actions for {self.dataset!r}; name them with --positive_actions.")
            return list(DEFAULT_POSITIVE_ACTIONS[self.dataset])
        names = split_names(self.positive_actions)
        unknown = [name for name in names if name not in known_actions]
        if unknown:
            raise ValueError(f"Unknown action {unknown[0]!r} in --positive_actions; the data has {list(known_actions)}.")
        return names


@dataclass
class TrainingArguments:
    """The run: where it writes, how long and how fast it trains, how it checkpoints and resumes."""

    output_dir: str = field(default="outputs/run", metadata={"help": "Run folder: model/ (or adapter/), checkpoints/, logs."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Delete the outputs another run left in --output_dir instead of refusing it."}
    )
    seed: int = 42
    per_device_train_batch_size: int = 128
    per_device_eval_batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    num_train_epochs: int = 1
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: epochs decide)."})
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip gradients at this norm (0: measure, do not clip)."})
    mixed_precision: str = field(default="auto", metadata={"help": "'auto' (bf16 on GPU, none on CPU), 'no', 'bf16', 'fp16'."})
    logging_steps: int = 10
    checkpointing_steps: int = field(default=500, metadata={"help": "Save a resumable checkpoint every N steps."})
    checkpoints_total_limit: int = field(default=2, metadata={"help": "Keep this run's newest N checkpoints."})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "'latest' or a checkpoint folder."})
    stop_after_steps: Optional[int] = field(
        default=None, metadata={"help": "Save a checkpoint and exit after N steps, as if interrupted (tests)."}
    )
    max_train_minutes: Optional[float] = field(
        default=None,
        metadata={"help": "Stop training once this much training time is spent (validation not counted), then test and "
                  "save as at the end of the plan: runs at a fixed wall-time budget. `--resume_from_checkpoint latest` with a "
                  "new budget trains on from where it stopped."},
    )
    report_to: Optional[str] = field(default=None, metadata={"help": "An Accelerate tracker, e.g. 'tensorboard'."})
    ddp_timeout: int = field(
        default=1800,
        metadata={"help": "Seconds a process waits in a collective (gradient sync, barrier) before it fails with a "
                  "traceback instead of hanging, as in transformers. Raise it when the main process encodes a large "
                  "prepared log for the first time while the others wait."},
    )
    eval_every_epochs: int = field(default=0, metadata={"help": "Validate every N epochs (0: only the final test)."})
    load_best_model_at_end: bool = field(
        default=False,
        metadata={"help": "Keep the weights of the best validation (NDCG@10 in pretraining, AUC in CTR fine-tuning; in "
                  "<output_dir>/best_model) and test and save those: the epoch is chosen on validation only. Needs "
                  "--eval_every_epochs and an out-of-sample validation (pretraining: --train_holdout 2; CTR: "
                  "--validation_cut_quantile)."},
    )
    early_stopping_patience: int = field(
        default=0, metadata={"help": "With --load_best_model_at_end: stop after N validations without a better one (0: never)."}
    )

    def __post_init__(self) -> None:
        check_ranges(
            self,
            positive=("per_device_train_batch_size", "per_device_eval_batch_size", "learning_rate", "num_train_epochs",
                      "gradient_accumulation_steps", "logging_steps", "checkpointing_steps", "stop_after_steps",
                      "max_train_minutes", "ddp_timeout"),
            non_negative=("seed", "weight_decay", "warmup_steps", "max_grad_norm", "checkpoints_total_limit",
                          "eval_every_epochs", "early_stopping_patience"),
        )
        if (self.load_best_model_at_end or self.early_stopping_patience) and not self.eval_every_epochs:
            raise ValueError("--load_best_model_at_end and --early_stopping_patience need --eval_every_epochs >= 1.")
        if self.early_stopping_patience and not self.load_best_model_at_end:
            raise ValueError("--early_stopping_patience stops at the best validation's patience: add --load_best_model_at_end true.")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"--max_steps must be -1 (the epochs decide) or >= 1, got {self.max_steps}.")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"--mixed_precision must be 'auto', 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}.")


@dataclass
class PretrainingArguments(TrainingArguments):
    output_dir: str = field(default="outputs/pretrain", metadata={"help": "Run folder: model/, checkpoints/, logs."})
    num_train_epochs: int = 20
    adam_beta2: float = 0.98
    packing: bool = field(
        default=True,
        metadata={"help": "Pack random users into rows of max_length events (longest first, each into the first row with "
                  "room), attention kept within each user: no compute on padding, the same losses (benchmarks/RESULTS.md "
                  "'Packed batches'). false: one padded user per row."},
    )
    per_device_train_batch_tokens: Optional[int] = field(
        default=None,
        metadata={"help": "With --packing: events per batch (on average). Default: per_device_train_batch_size times the "
                  "mean sequence length, i.e. as many users per step as padded batches."},
    )
    group_by_length: bool = field(
        default=False,
        metadata={"help": "Padded batches of sequences of similar length (needs --packing false): less padding, but lower "
                  "quality after equal epochs (benchmarks/RESULTS.md)."},
    )
    item_optimizer: str = field(
        default="adamw",
        metadata={"help": "How the item tables train: 'adamw' (with the rest of the model; its state is two copies of "
                  "the tables and every step sweeps them) or 'rowwise_adagrad' (sparse gradients: a step reads and writes "
                  "only the rows in the batch, one float of state per row; for catalogues of millions of items).",
                  "choices": ["adamw", "rowwise_adagrad"]},
    )
    item_learning_rate: float = field(
        default=0.2,
        metadata={"help": "With --item_optimizer rowwise_adagrad: its learning rate (the best of 0.01, 0.05 and 0.2 on "
                  "ML-1M: benchmarks/RESULTS.md, 'Large vocabularies')."},
    )
    gradient_checkpointing: bool = False
    full_softmax_max_items: int = field(
        default=100_000,
        metadata={"help": "Refuse --full_softmax true above this many item ids (and --full_softmax auto samples negatives "
                  "above it): it scores every id at every position "
                  "(batch tokens x ids floats, several times over), which runs out of memory on large catalogues."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(
            self, positive=("full_softmax_max_items", "per_device_train_batch_tokens", "item_learning_rate"),
            fractions=("adam_beta2",),
        )
        if self.packing and self.group_by_length:
            raise ValueError("--group_by_length batches padded rows: use it with --packing false (packed rows have no padding to save).")


# ----- CTR fine-tuning -------------------------------------------------------------------------------------------

@dataclass
class CTRDataArguments(EventSourceArguments):
    """Which impressions are samples of the use case, and how they are split and featurised."""

    use_case: str = field(
        default="like",
        metadata={"help": f"One of {sorted(CTR_USE_CASES)}, or 'custom' with --positive_actions/--negative_actions."},
    )
    positive_actions: Optional[str] = field(default=None, metadata={"help": "Custom use case: comma-separated actions labelled 1."})
    negative_actions: Optional[str] = field(default=None, metadata={"help": "Custom use case: comma-separated actions labelled 0."})
    user_features: str = field(
        default="auto",
        metadata={"help": "'auto' (ml-1m.user for ML-1M), 'none', or a CSV/Parquet file with user_id + feature columns."},
    )
    side_features: bool = field(default=True, metadata={"help": "Feed user and item side features to the head."})
    cut_quantile: float = field(default=0.9, metadata={"help": "Global time cut (quantile of event times): train before, test after."})
    validation_cut_quantile: Optional[float] = field(
        default=None,
        metadata={"help": "Validation slice: impressions between this quantile of event times and --cut_quantile leave "
                  "training and are validated on every --eval_every_epochs epochs (early stopping, best epoch); the "
                  "test period is never used for a choice. None: no validation."},
    )
    max_validation_samples: Optional[int] = field(
        default=None, metadata={"help": "Validate on a seeded random subset of N samples of the validation slice."}
    )
    max_history: int = field(default=50, metadata={"help": "Most recent history events before each impression."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Train on a seeded random subset of N samples."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Test on a seeded random subset of N samples."})
    max_slots_per_field: int = field(default=8, metadata={"help": "Most values kept per multi-valued side feature."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(
            self, positive=("max_history", "max_train_samples", "max_eval_samples", "max_validation_samples", "max_slots_per_field"),
            quantiles=("cut_quantile", "validation_cut_quantile"),
        )
        if self.validation_cut_quantile is not None and self.validation_cut_quantile >= self.cut_quantile:
            raise ValueError(
                f"--validation_cut_quantile ({self.validation_cut_quantile}) must be below --cut_quantile "
                f"({self.cut_quantile}): the validation slice lies before the test period."
            )

    def actions(self) -> tuple[list[str], list[str]]:
        """The use case's positive and negative actions (see `use_case_actions`)."""
        return use_case_actions(
            self.use_case, self.dataset, split_names(self.positive_actions), split_names(self.negative_actions)
        )

    def load_splits(self, seed: int) -> tuple[Any, Any]:
        """
        The events and the use case's `CTRSplits` (train, validation, test impressions with their histories) as
        fine-tuning builds them; `seed` picks the seeded subsets. Benchmarks call it to see exactly the same samples.
        """
        from .data import ctr_splits, load_user_features_from_args

        positive_actions, negative_actions = self.actions()
        events = self.load_events()
        splits = ctr_splits(
            events, positive_actions=positive_actions, negative_actions=negative_actions, cut_quantile=self.cut_quantile,
            validation_cut_quantile=self.validation_cut_quantile, max_validation_samples=self.max_validation_samples,
            user_features=load_user_features_from_args(self.user_features, self.dataset, self.data_dir)
            if self.side_features else None,
            max_train_samples=self.max_train_samples, max_test_samples=self.max_eval_samples, seed=seed,
        )
        return events, splits


@dataclass
class TransferArguments:
    """Which pretrained base, and how it becomes the ranker (GPSD's transfer strategies or a LoRA adapter)."""

    base: str = field(
        default="outputs/ml1m_ctr_base/model",
        metadata={"help": "Pretrained folder or hub repo id (its tokenizer and architecture are used for every strategy)."},
    )
    base_revision: Optional[str] = field(default=None, metadata={"help": "Branch, tag or commit of a hub --base."})
    transfer: str = field(
        default="full", metadata={"help": "; ".join(f"'{k}': {v}" for k, v in TRANSFER_STRATEGIES.items())}
    )
    lora_rank: int = 4
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    lora_use_dora: bool = field(
        default=False,
        metadata={"help": "--transfer lora: DoRA (PEFT's `use_dora`): each adapted weight also learns its column norms."},
    )
    lora_item_embeddings_rank: int = field(
        default=0,
        metadata={"help": "--transfer lora: also adapt the item table with an embedding LoRA of this rank (0: frozen)."},
    )
    allow_leaky_base: bool = field(
        default=False, metadata={"help": "Accept a base pretrained on events after the cut (its figures then leak)."}
    )

    def __post_init__(self) -> None:
        check_ranges(
            self, positive=("lora_rank", "lora_alpha"), non_negative=("lora_item_embeddings_rank",), fractions=("lora_dropout",)
        )
        if self.transfer not in TRANSFER_STRATEGIES:
            raise ValueError(f"--transfer must be one of {sorted(TRANSFER_STRATEGIES)}, got {self.transfer!r}.")


# The ranking model's own fields (the side-feature vocabulary and slots come from the data).
CTR_MODEL_FIELDS = (
    "ctr_fusion", "ctr_head", "ctr_head_hidden_sizes", "ctr_num_cross_layers", "ctr_dropout", "ctr_feature_embedding_size",
    "ctr_aux_loss_weight", "ctr_candidate_item_features", "ctr_item_bias", "ctr_history_count_features",
    "ctr_history_recency_features", "ctr_history_field_match_features", "ctr_young_item_dropout", "ctr_young_item_age_days",
)
CTRModelArguments = config_arguments(
    "CTRModelArguments", CTR_MODEL_FIELDS, bases=(TransferArguments,),
    doc="The base, the transfer strategy and the ranking model's `PinFMConfig` fields.",
)


@dataclass
class CTRTrainingArguments(TrainingArguments):
    output_dir: str = field(default="outputs/finetune_ctr", metadata={"help": "Run folder: model/ or adapter/, checkpoints/, logs."})
    per_device_train_batch_size: int = 256
    per_device_eval_batch_size: int = 1024
    learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of new parts: head, random layers, LoRA."})
    backbone_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of trainable pretrained weights."})
    warmup_steps: int = 50
    candidate_id_randomization: float = field(
        default=0.0, metadata={"help": "Cold start: share of training candidates whose id becomes a random hash bucket."}
    )
    deduplicate_histories: bool = field(
        default=False,
        metadata={"help": "DCAT: batch impressions of one request together and encode their shared history once "
                  "(same logits; fewer encoder passes). Batches then hold whole requests, about the same number of samples."},
    )

    card_comparison: Optional[str] = field(
        default=None,
        metadata={"help": "A report of benchmarks/bench_ctr.py (e.g. benchmarks/results/ctr_transfer.json): its figures "
                  "for this use case (every strategy and peer, over seeds) go into the saved model card."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(self, positive=("backbone_learning_rate",), fractions=("candidate_id_randomization",))
        if self.card_comparison is not None and not Path(self.card_comparison).is_file():
            raise ValueError(f"--card_comparison {self.card_comparison}: no such file.")


def split_names(value: Optional[str]) -> list[str]:
    """`"a, b"` -> `["a", "b"]`: a comma-separated flag of names."""
    return [name.strip() for name in (value or "").split(",") if name.strip()]


__all__ = [
    "CTR_MODEL_FIELDS",
    "CTRDataArguments",
    "CTRModelArguments",
    "CTRTrainingArguments",
    "ModelArguments",
    "PretrainingArguments",
    "PretrainingDataArguments",
    "TrainingArguments",
    "ENCODER_FIELDS",
    "TransferArguments",
    "config_arguments",
    "split_names",
]
