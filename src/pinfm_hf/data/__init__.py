"""Raw events -> validated event table -> per-user sequences -> collator."""

from .collator import PinFMDataCollator
from .ctr import (
    CTR_USE_CASES,
    FEATURES_FILE_NAME,
    CTRDataset,
    CTRFeatureEncoder,
    CTRImpressionGroups,
    CTRUseCase,
    build_ctr_samples,
    collate_impression_groups,
    randomize_candidate_ids,
    split_ctr_samples,
)
from .events import (
    EVENT_COLUMNS,
    EventTable,
    EventValidationError,
    drop_duplicate_events,
    make_event_table,
    validate_events,
)
from .loaders import (
    DEFAULT_POSITIVE_ACTIONS,
    load_dataset_by_name,
    load_events,
    load_events_from_args,
    load_movielens_atomic,
    load_movielens_dat,
    load_movielens_users,
    load_taobao,
)
from .sequences import (
    build_user_sequences,
    leave_last_out_split,
    load_sequences,
    quantile_timestamp,
    save_sequences,
    time_split,
)


__all__ = [
    "CTRDataset",
    "CTRFeatureEncoder",
    "CTRImpressionGroups",
    "CTRUseCase",
    "CTR_USE_CASES",
    "DEFAULT_POSITIVE_ACTIONS",
    "EVENT_COLUMNS",
    "EventTable",
    "EventValidationError",
    "FEATURES_FILE_NAME",
    "PinFMDataCollator",
    "build_ctr_samples",
    "collate_impression_groups",
    "randomize_candidate_ids",
    "build_user_sequences",
    "drop_duplicate_events",
    "leave_last_out_split",
    "load_dataset_by_name",
    "load_events",
    "load_events_from_args",
    "load_movielens_atomic",
    "load_movielens_dat",
    "load_movielens_users",
    "load_sequences",
    "load_taobao",
    "make_event_table",
    "quantile_timestamp",
    "save_sequences",
    "split_ctr_samples",
    "time_split",
    "validate_events",
]
