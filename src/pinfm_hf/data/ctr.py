"""CTR fine-tuning data: events -> per-user sequences -> impressions (`samples`) -> `CTRDataset` -> collator.

An impression is a real event whose action is a positive or a negative of the use case; its history is the user's
events *strictly* before it (same-second events are excluded), so no label or future event leaks into the input.
Everything is computed on flat numpy/pyarrow arrays: ML-1M's million impressions take about a second to build.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from transformers.utils import logging

from ..io_utils import atomic_write_json
from .events import EVENT_COLUMNS, SURFACE_COLUMN, EventTable, EventValidationError
from .sequences import build_user_sequences, quantile_timestamp, sequence_table


if TYPE_CHECKING:  # the tokenizer is passed in; the data layer never imports the model side
    from ..tokenization_pinfm import PinFMTokenizer


logger = logging.get_logger(__name__)

FEATURES_FILE_NAME = "ctr_features.json"
# Columns of `samples` that are not side features.
SAMPLE_COLUMNS = (
    "user_index", "history_length", "user_id", "item_id", "timestamp", "label", "item_first_seen", SURFACE_COLUMN
)
PAD_FEATURE_ID, UNK_FEATURE_ID = 0, 1


@dataclass(frozen=True)
class CTRUseCase:
    """
    A CTR task on one data set: which real events are impressions and which of them count as clicks.

    Args:
        name (`str`): key in `CTR_USE_CASES`.
        dataset (`str`): data set name for `load_dataset_by_name`.
        positive_actions (`tuple[str, ...]`): actions whose events are positive impressions (label 1).
        negative_actions (`tuple[str, ...]`): actions whose events are negative impressions (label 0).
        description (`str`): one line for logs and model cards.
    """

    name: str
    dataset: str
    positive_actions: tuple[str, ...]
    negative_actions: tuple[str, ...]
    description: str


CTR_USE_CASES: dict[str, CTRUseCase] = {
    case.name: case
    for case in (
        CTRUseCase("like", "ml-1m", ("rating_4", "rating_5"), ("rating_1", "rating_2", "rating_3"), "rating >= 4"),
        CTRUseCase("love", "ml-1m", ("rating_5",), ("rating_1", "rating_2", "rating_3", "rating_4"), "rating == 5"),
        CTRUseCase(
            "purchase", "taobao", ("buy",), ("pv",),
            "buy vs pv; cart/fav are not impressions but stay in histories",
        ),
        CTRUseCase("engage", "taobao", ("cart", "fav", "buy"), ("pv",), "cart, fav or buy vs pv"),
    )
}


def _item_feature_names(events: Union[EventTable, pa.Table]) -> list[str]:
    if isinstance(events, EventTable):
        return list(events.item_features)
    return [c for c in events.column_names if c not in EVENT_COLUMNS and c != SURFACE_COLUMN]


def _check_actions(table: pa.Table, positive_actions: Sequence[str], negative_actions: Sequence[str]) -> None:
    if isinstance(positive_actions, str) or isinstance(negative_actions, str):
        raise TypeError("`positive_actions` and `negative_actions` must be sequences of action names, not strings.")
    if not positive_actions or not negative_actions:
        raise ValueError("`positive_actions` and `negative_actions` must both be non-empty.")
    known = sorted(pc.unique(table["action"]).to_pylist())
    unknown = sorted((set(positive_actions) | set(negative_actions)) - set(known))
    if unknown:
        raise ValueError(f"Action(s) {unknown} do not occur in the events; known actions: {known}.")
    both = sorted(set(positive_actions) & set(negative_actions))
    if both:
        raise ValueError(f"Action(s) {both} are both positive and negative.")


def _user_feature_columns(user_features: pa.Table, user_ids: pa.Array, taken: set[str]) -> dict[str, pa.Array]:
    """Per-user (aligned with `user_ids`) string columns of `user_features`."""
    if "user_id" not in user_features.column_names:
        raise ValueError(f"`user_features` needs a `user_id` column; found {user_features.column_names}.")
    names = [c for c in user_features.column_names if c != "user_id"]
    clashes = sorted(set(names) & taken)
    if clashes:
        raise ValueError(f"`user_features` column(s) {clashes} clash with sample or item feature columns.")
    keys = pc.cast(user_features["user_id"], pa.string()).combine_chunks()
    if pc.count_distinct(keys).as_py() != len(keys):
        counts = pc.value_counts(keys)
        duplicated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
        raise EventValidationError(f"`user_features`: user_id {duplicated[0].as_py()!r} appears more than once.")
    index = pc.index_in(user_ids, value_set=keys)
    if index.null_count:
        missing = pc.filter(user_ids, pc.is_null(index))
        raise EventValidationError(
            f"`user_features`: no row for user_id {missing[0].as_py()!r} ({len(missing)} user(s) of the events "
            "are missing)."
        )
    return {name: pc.take(pc.cast(user_features[name], pa.string()), index) for name in names}


def build_ctr_samples(
    events: Union[EventTable, pa.Table],
    *,
    positive_actions: Sequence[str],
    negative_actions: Sequence[str],
    user_features: Optional[pa.Table] = None,
) -> tuple[datasets.Dataset, pa.Table]:
    """
    Turn an event log into per-user sequences and one CTR sample per impression.

    Args:
        events (`EventTable` or `pa.Table`): validated events (see `validate_events`).
        positive_actions (`Sequence[str]`): actions of positive impressions (label 1), e.g. `CTR_USE_CASES["like"]`.
        negative_actions (`Sequence[str]`): actions of negative impressions (label 0). Events with other actions
            are not impressions but stay in the histories.
        user_features (`pa.Table`, *optional*): a `user_id` column plus user side features (e.g.
            `load_movielens_users`), joined on `user_id` and cast to strings; every user of the events needs a row.

    Returns:
        `(sequences, samples)`: `sequences` is `build_user_sequences(events)`; `samples` has one row per
        impression, in sequence order (`user_index`, then position), with `user_index` (row in `sequences`),
        `history_length` (the user's events with a timestamp strictly before the impression: they are the first
        `history_length` events of the user's sequence), `user_id`, `item_id`, `timestamp`, `label` (int8),
        `item_first_seen` (the item's first event time in the log: its age at the impression is `timestamp -
        item_first_seen`, never negative), `surface` when the events have one, then one string column per item
        feature and per user feature.
    """
    table = events.table if isinstance(events, EventTable) else events
    _check_actions(table, positive_actions, negative_actions)
    item_features = _item_feature_names(events)
    sequences = build_user_sequences(events)
    seq = sequence_table(sequences)

    # Flatten the sequences: samples then follow their order by construction, whatever order the sort produced.
    offsets = seq["item_ids"].combine_chunks().offsets.to_numpy().astype(np.int64)
    lengths = np.diff(offsets)
    num_events = int(offsets[-1])
    user_index = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    timestamps = seq["timestamps"].combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    # Within a user the timestamps are sorted, so the events strictly before position p are those before the
    # first position with p's timestamp: a run starts where the user or the timestamp changes.
    run_start = np.ones(num_events, dtype=bool)
    run_start[1:] = (user_index[1:] != user_index[:-1]) | (timestamps[1:] != timestamps[:-1])
    first_of_run = np.maximum.accumulate(np.where(run_start, np.arange(num_events, dtype=np.int64), 0))
    history_length = first_of_run - offsets[:-1][user_index]

    actions = seq["actions"].combine_chunks().flatten()
    is_positive = pc.is_in(actions, value_set=pa.array(list(positive_actions), pa.string()))
    is_impression = pc.or_(is_positive, pc.is_in(actions, value_set=pa.array(list(negative_actions), pa.string())))
    keep = is_impression.to_numpy(zero_copy_only=False)
    rows = user_index[keep]
    columns = {
        "user_index": pa.array(rows, pa.int64()),
        "history_length": pa.array(history_length[keep], pa.int64()),
        "user_id": seq["user_id"].combine_chunks().take(pa.array(rows)),
        "item_id": seq["item_ids"].combine_chunks().flatten().filter(is_impression),
        "timestamp": pa.array(timestamps[keep], pa.int64()),
        "label": pa.array(is_positive.to_numpy(zero_copy_only=False)[keep].astype(np.int8), pa.int8()),
    }
    # Each item's first event anywhere in the log: its age at an impression, and whether it is fresh after a cut.
    first_seen = table.group_by("item_id").aggregate([("timestamp", "min")])
    position = pc.index_in(columns["item_id"], value_set=first_seen["item_id"])
    columns["item_first_seen"] = pc.cast(pc.take(first_seen["timestamp_min"], position), pa.int64())
    if "surfaces" in seq.column_names:
        columns[SURFACE_COLUMN] = seq["surfaces"].combine_chunks().flatten().filter(is_impression)
    for name in item_features:
        columns[name] = pc.cast(seq[name].combine_chunks().flatten().filter(is_impression), pa.string())
    if user_features is not None:
        per_user = _user_feature_columns(user_features, seq["user_id"].combine_chunks(), set(columns))
        columns.update({name: pc.take(values, columns["user_index"]) for name, values in per_user.items()})
    samples = pa.table(columns)
    num_positive = int(pc.sum(samples["label"]).as_py() or 0)
    logger.info(
        f"CTR samples: {samples.num_rows:,} impressions of {table.num_rows:,} events from {len(sequences):,} users; "
        f"positive rate {num_positive / max(samples.num_rows, 1):.4f}."
    )
    if samples.num_rows == 0:
        logger.warning("No event has a positive or negative action: there are no CTR samples.")
    return sequences, samples


def split_ctr_samples(samples: pa.Table, cut_timestamp: int) -> tuple[pa.Table, pa.Table]:
    """
    Split impressions at one global time: train has `timestamp < cut_timestamp`, test `timestamp >= cut_timestamp`.

    Only impressions are split. A test impression's history may include post-cut events before it, as at serving
    time; the train impressions never see a test label. Use `quantile_timestamp` to pick the cut.
    """
    if "timestamp" not in samples.column_names or "label" not in samples.column_names:
        raise ValueError(f"`samples` needs `timestamp` and `label` columns; found {samples.column_names}.")
    cut = int(cut_timestamp)
    before = pc.less(samples["timestamp"], cut)
    train, test = samples.filter(before), samples.filter(pc.invert(before))

    def describe(part: pa.Table) -> str:
        rate = (pc.sum(part["label"]).as_py() or 0) / part.num_rows if part.num_rows else float("nan")
        return f"{part.num_rows:,} impressions (positive rate {rate:.4f})"

    logger.info(f"CTR split at {cut}: train {describe(train)}, test {describe(test)}.")
    for name, part in (("train", train), ("test", test)):
        if part.num_rows == 0:
            logger.warning(f"CTR split at {cut}: the {name} split is empty.")
    return train, test


def use_case_actions(
    use_case: str,
    dataset: str,
    positive_actions: Optional[Sequence[str]] = None,
    negative_actions: Optional[Sequence[str]] = None,
) -> tuple[list[str], list[str]]:
    """
    The positive and negative actions of a use case: one of `CTR_USE_CASES` (which must be defined on `dataset`), or
    `"custom"` with both lists given.
    """
    if use_case == "custom":
        if not positive_actions or not negative_actions:
            raise ValueError("--use_case custom needs both --positive_actions and --negative_actions.")
        return list(positive_actions), list(negative_actions)
    if use_case not in CTR_USE_CASES:
        raise ValueError(f"Unknown --use_case {use_case!r}; choose one of {sorted(CTR_USE_CASES)} or 'custom'.")
    case = CTR_USE_CASES[use_case]
    if dataset != case.dataset:
        raise ValueError(f"--use_case {case.name!r} is defined on {case.dataset!r}, not {dataset!r}.")
    return list(case.positive_actions), list(case.negative_actions)


def side_feature_fields(samples: pa.Table) -> list[str]:
    """The side-feature columns of CTR samples (item and user features): every column that is not a sample column."""
    return [c for c in samples.column_names if c not in SAMPLE_COLUMNS]


@dataclass
class CTRSplits:
    """
    What [`ctr_splits`] returns: the per-user `sequences`, the `train` impressions (before `validation_cut`, or `cut`
    without a validation slice), the `valid` ones (from `validation_cut` to `cut`; `None` without one) and the `test`
    ones (from `cut` on), each a seeded subset of whole requests when asked.
    """

    sequences: datasets.Dataset
    train: pa.Table
    test: pa.Table
    cut: int
    valid: Optional[pa.Table] = None
    validation_cut: Optional[int] = None


def ctr_splits(
    events: Union[EventTable, pa.Table],
    *,
    positive_actions: Sequence[str],
    negative_actions: Sequence[str],
    cut_quantile: float,
    validation_cut_quantile: Optional[float] = None,
    user_features: Optional[pa.Table] = None,
    max_train_samples: Optional[int] = None,
    max_validation_samples: Optional[int] = None,
    max_test_samples: Optional[int] = None,
    seed: int = 0,
) -> CTRSplits:
    """
    The CTR data of a use case, as fine-tuning, scoring and benchmarks all build it: impressions with their histories
    (`build_ctr_samples`), split at the event-time quantile `cut_quantile` (`split_ctr_samples`), then seeded subsets of
    whole requests (`sample_requests`; train with `seed`, test with `seed + 1`, validation with `seed + 2`).

    `validation_cut_quantile` (below `cut_quantile`) takes the impressions between the two cuts out of training, as a
    validation slice for early stopping: it lies before the test period, as a model trained up to a day and checked on
    the next would, and the test impressions stay untouched by any choice made on it.
    """
    sequences, samples = build_ctr_samples(
        events, positive_actions=positive_actions, negative_actions=negative_actions, user_features=user_features
    )
    cut = quantile_timestamp(events, cut_quantile)
    train, test = split_ctr_samples(samples, cut)
    valid, validation_cut = None, None
    if validation_cut_quantile is not None:
        if not 0.0 < validation_cut_quantile < cut_quantile:
            raise ValueError(
                f"validation_cut_quantile ({validation_cut_quantile}) must be between 0 and cut_quantile ({cut_quantile}): "
                "the validation slice lies before the test period."
            )
        validation_cut = quantile_timestamp(events, validation_cut_quantile)
        train, valid = split_ctr_samples(train, validation_cut)
        if valid.num_rows == 0:
            raise ValueError(
                f"No impression lies between the validation cut ({validation_cut_quantile} quantile, {validation_cut}) and "
                f"the test cut ({cut_quantile}, {cut}): lower validation_cut_quantile."
            )
        valid = sample_requests(valid, max_validation_samples, seed + 2)
    return CTRSplits(
        sequences=sequences,
        train=sample_requests(train, max_train_samples, seed),
        test=sample_requests(test, max_test_samples, seed + 1),
        cut=cut,
        valid=valid,
        validation_cut=validation_cut,
    )


def _values_per_row(samples: pa.Table, field: str) -> pa.ListArray:
    """Whitespace-separated values of `field`, one list per row; a null is an error, not an empty list."""
    if field not in samples.column_names:
        raise ValueError(f"Side-feature column {field!r} is missing; found {samples.column_names}.")
    column = samples[field].combine_chunks()
    if not pa.types.is_string(column.type):
        column = pc.cast(column, pa.string())
    if column.null_count:
        row = pc.index(pc.is_null(column), True).as_py()
        raise ValueError(f"Side-feature column {field!r} has a missing (null) value at row {row}.")
    # Trimmed first, the split yields no empty strings except [""] for a blank row, which must be no value.
    values = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(column))
    flat = values.flatten()
    if not pc.any(pc.equal(pc.utf8_length(flat), 0)).as_py():
        return values
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0).to_numpy(zero_copy_only=False)
    lengths = np.where(blank, 0, pc.list_value_length(values).to_numpy(zero_copy_only=False))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int32())
    return pa.ListArray.from_arrays(offsets, flat.filter(pc.greater(pc.utf8_length(flat), 0)))


class CTRFeatureEncoder:
    """
    Side-feature vocabulary: `"field=value"` -> id, with 0 for padding and 1 for unknown values.

    Multi-valued fields (whitespace-separated values, e.g. ML-1M genres) get several slots, so every row encodes
    to the same width: field `f` fills a contiguous block of `slots[f]` columns, padded with 0.

    Args:
        fields (`list[str]`): the side-feature columns, in slot order.
        vocab (`list[str]`): `"field=value"` tokens for ids 2, 3, ...
        slots (`list[int]`): number of slots of each field (at least 1).
    """

    def __init__(self, fields: list[str], vocab: list[str], slots: list[int]):
        fields, vocab, slots = list(fields), list(vocab), [int(s) for s in slots]
        if not fields:
            raise ValueError("`fields` must name at least one side-feature column.")
        if len(set(fields)) != len(fields) or any("=" in f for f in fields):
            raise ValueError(f"`fields` ({fields}) must be unique and must not contain '='.")
        if len(slots) != len(fields) or any(s < 1 for s in slots):
            raise ValueError(f"`slots` ({slots}) must hold one positive count per field ({len(fields)} fields).")
        if len(set(vocab)) != len(vocab):
            raise ValueError("`vocab` has duplicate tokens.")
        self._fields, self._vocab, self._slots = fields, vocab, slots
        # Per field: its values and their global ids, for one `index_in` per field at encoding time.
        self._lookup: dict[str, tuple[pa.Array, np.ndarray]] = {}
        assigned = 0
        for field in fields:
            prefix = f"{field}="
            ids = [i for i, token in enumerate(vocab) if token.startswith(prefix)]
            values = pa.array([vocab[i][len(prefix) :] for i in ids], pa.string())
            self._lookup[field] = (values, np.asarray(ids, dtype=np.int64) + 2)
            assigned += len(ids)
        if assigned != len(vocab):
            stray = [t for t in vocab if t.split("=", 1)[0] not in fields][:5]
            raise ValueError(f"`vocab` tokens {stray} do not start with one of the fields {fields} and '='.")

    @classmethod
    def fit(
        cls, samples: pa.Table, fields: Sequence[str], max_slots_per_field: int = 8, min_count: int = 1
    ) -> "CTRFeatureEncoder":
        """
        Build the vocabulary from `samples` (fit on the train split only). Values seen fewer than `min_count` times
        stay unknown (id 1). Each field gets as many slots as its longest row has values, at most
        `max_slots_per_field`; extra values of longer rows are dropped, and the count of such rows is logged.
        Ties in count break by value, so the vocabulary is deterministic.
        """
        if isinstance(fields, str):
            raise TypeError("`fields` must be a sequence of column names, not a string.")
        if max_slots_per_field < 1 or min_count < 1:
            raise ValueError(
                f"`max_slots_per_field` ({max_slots_per_field}) and `min_count` ({min_count}) must be >= 1."
            )
        vocab, slots = [], []
        for field in fields:
            values = _values_per_row(samples, field)
            counts = pc.list_value_length(values).to_numpy(zero_copy_only=False)
            longest = int(counts.max()) if len(counts) else 0
            if longest > max_slots_per_field:
                logger.warning(
                    f"Side feature {field!r}: {(counts > max_slots_per_field).sum():,} of {len(counts):,} rows have "
                    f"more than {max_slots_per_field} values (up to {longest}); only the first "
                    f"{max_slots_per_field} are kept."
                )
            slots.append(max(min(longest, max_slots_per_field), 1))
            frequency = pc.value_counts(values.flatten()).to_pylist()
            kept = sorted(
                ((c["counts"], c["values"]) for c in frequency if c["counts"] >= min_count), key=lambda x: (-x[0], x[1])
            )
            vocab.extend(f"{field}={value}" for _, value in kept)
        encoder = cls(list(fields), vocab, slots)
        logger.info(f"CTR side features {encoder.fields}: {encoder.vocab_size:,} ids, slots {encoder.slots}.")
        return encoder

    @property
    def fields(self) -> list[str]:
        return list(self._fields)

    @property
    def vocab(self) -> list[str]:
        return list(self._vocab)

    @property
    def slots(self) -> list[int]:
        return list(self._slots)

    @property
    def num_slots(self) -> int:
        return sum(self._slots)

    @property
    def vocab_size(self) -> int:
        """Size of the embedding table: padding, unknown and the known tokens."""
        return len(self._vocab) + 2

    def encode(self, samples: pa.Table, fields: Optional[Sequence[str]] = None) -> np.ndarray:
        """
        Feature ids of every row of `samples`: `int64` array of shape `(num_rows, num_slots)`; with `fields`, only
        those fields' slots (in the encoder's field order), e.g. an item table's item fields.
        """
        if fields is not None and set(fields) - set(self._fields):
            raise ValueError(f"Fields {sorted(set(fields) - set(self._fields))} are not encoded (fields: {self._fields}).")
        encoded = [(f, w) for f, w in zip(self._fields, self._slots) if fields is None or f in fields]
        out = np.full((samples.num_rows, sum(w for _, w in encoded)), PAD_FEATURE_ID, dtype=np.int64)
        column = 0
        for field, width in encoded:
            values = _values_per_row(samples, field)
            offsets = values.offsets.to_numpy().astype(np.int64)
            lengths = np.diff(offsets)
            flat = values.values[offsets[0] : offsets[-1]]
            position = np.arange(len(flat), dtype=np.int64) - np.repeat(offsets[:-1] - offsets[0], lengths)
            row = np.repeat(np.arange(samples.num_rows, dtype=np.int64), lengths)
            known_values, known_ids = self._lookup[field]
            local = pc.index_in(flat, value_set=known_values)
            ids = np.full(len(flat), UNK_FEATURE_ID, dtype=np.int64)
            found = pc.is_valid(local).to_numpy(zero_copy_only=False)
            ids[found] = known_ids[pc.drop_null(local).to_numpy()]
            kept = position < width
            out[row[kept], column + position[kept]] = ids[kept]
            column += width
        return out

    def save(self, directory: Union[str, os.PathLike]) -> Path:
        """Write `ctr_features.json` into `directory` (created if needed), atomically; returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / FEATURES_FILE_NAME
        atomic_write_json(path, {"fields": self._fields, "slots": self._slots, "vocab": self._vocab}, indent=None)
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "CTRFeatureEncoder":
        """
        Read what `save` wrote: the `ctr_features.json` file, or the folder holding it. (From a hub repo id:
        `CTRFeatureEncoder.load(pinfm_hf.hub.cached_file_from(repo_id, FEATURES_FILE_NAME, revision))`.)
        """
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            path = path / FEATURES_FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"No CTR feature vocabulary at {path} (written by `CTRFeatureEncoder.save`).")
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
            return cls(state["fields"], state["vocab"], state["slots"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"Corrupt CTR feature vocabulary {path}: {type(e).__name__}: {e}") from e

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fields={self._fields}, slots={self._slots}, vocab_size={self.vocab_size})"


def item_feature_table(
    events: Union[EventTable, pa.Table], tokenizer: "PinFMTokenizer", encoder: CTRFeatureEncoder, fields: Sequence[str]
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """
    `(item_token_ids (K,), feature_ids (K, slots of fields))` for every item of `events` the tokenizer knows (items it
    hashes to a bucket are left out: a bucket is shared), each from its first event's values of the item `fields`:
    what [`PinFMForCTR.set_item_features`] records for `ctr_history_field_match_features`.
    """
    table = events.table if isinstance(events, EventTable) else events
    missing = [f for f in fields if f not in table.column_names]
    if missing:
        raise ValueError(f"The events have no item feature column(s) {missing}.")
    items = pc.unique(table["item_id"])
    first_event = pc.index_in(items, value_set=table["item_id"])  # index_in finds each item's first row
    token_ids = tokenizer.item_ids_to_token_ids(items)
    known = token_ids < tokenizer.first_bucket_id
    rows = table.select(list(fields)).take(first_event).filter(pa.array(known))
    return torch.from_numpy(token_ids[known]), torch.from_numpy(encoder.encode(rows, fields=fields))


class CTRDataset(torch.utils.data.Dataset):
    """
    CTR examples for early fusion: a user's history strictly before the impression (its `max_history` most recent
    events) with the candidate appended as the last event, marked with the candidate action.

    The sequences are tokenised once into flat arrays; an item is a slice of them plus the candidate, so the
    dataset costs a few bytes per event and `__getitem__` no Python loop over events.

    Args:
        sequences (`datasets.Dataset`): the `sequences` returned by `build_ctr_samples`.
        samples (`pa.Table`): its `samples`, or a split of them (`split_ctr_samples`).
        tokenizer (`PinFMTokenizer`): maps items, actions and surfaces to ids; an unknown action is an error.
        max_history (`int`): number of most recent history events kept (the collator's `max_length` is
            `max_history + 1`).
        feature_encoder (`CTRFeatureEncoder`, *optional*): adds `side_feature_ids` of shape `(num_slots,)`.

    Each item is a dict of numpy arrays: `input_ids`, `action_ids`, `timestamps`, `surface_ids` (when the tokenizer
    and the sequences have surfaces), `label` (float32 scalar), `user_index` (int64 scalar, for GAUC),
    `candidate_age` (int64 seconds since the item's first event, when `samples` has `item_first_seen`) and
    `side_feature_ids`.
    """

    def __init__(
        self,
        sequences: datasets.Dataset,
        samples: pa.Table,
        tokenizer: "PinFMTokenizer",
        *,
        max_history: int,
        feature_encoder: Optional[CTRFeatureEncoder] = None,
    ):
        if max_history < 0:
            raise ValueError(f"`max_history` ({max_history}) must be >= 0.")
        required = ("user_index", "history_length", "item_id", "timestamp", "label")
        missing = [c for c in required if c not in samples.column_names]
        if missing:
            raise ValueError(f"`samples` is missing column(s) {missing}; build it with `build_ctr_samples`.")
        self.max_history = max_history
        seq = sequence_table(sequences)
        lengths = pc.list_value_length(seq["item_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
        # One row per user with every event: max_length = the longest sequence.
        encoded = tokenizer.encode_sequences(seq, max_length=max(int(lengths.max()), 1))
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.input_ids = encoded["input_ids"].combine_chunks().flatten().to_numpy()
        self.action_ids = encoded["action_ids"].combine_chunks().flatten().to_numpy()
        self.timestamps = encoded["timestamps"].combine_chunks().flatten().to_numpy()
        assert len(self.input_ids) == self.offsets[-1], "encode_sequences must keep every event"
        self.surface_ids = None
        if "surface_ids" in encoded.column_names:
            if SURFACE_COLUMN not in samples.column_names:
                raise ValueError("The sequences have surfaces but `samples` has no `surface` column.")
            self.surface_ids = encoded["surface_ids"].combine_chunks().flatten().to_numpy()
            surfaces = pa.array(tokenizer.surface_tokens, pa.string())
            surface_index = pc.fill_null(pc.index_in(samples[SURFACE_COLUMN], value_set=surfaces), 1)  # 1: unknown
            self.candidate_surface_ids = surface_index.to_numpy(zero_copy_only=False).astype(np.int64)

        self.user_index = samples["user_index"].to_numpy().astype(np.int64)
        self.history_length = samples["history_length"].to_numpy().astype(np.int64)
        self.candidate_timestamps = samples["timestamp"].to_numpy().astype(np.int64)
        self.labels = samples["label"].to_numpy().astype(np.float32)
        self.candidate_ages = None
        if "item_first_seen" in samples.column_names:
            self.candidate_ages = self.candidate_timestamps - samples["item_first_seen"].to_numpy().astype(np.int64)
        self._check_histories(lengths)
        self.candidate_ids = tokenizer.item_ids_to_token_ids(samples["item_id"])
        self.candidate_action_id = tokenizer.candidate_action_id
        self.side_feature_ids = feature_encoder.encode(samples) if feature_encoder is not None else None

    def _check_histories(self, lengths: np.ndarray) -> None:
        """Samples must come from these sequences, and a history must end strictly before its impression."""
        if len(self.user_index) == 0:
            return
        if self.user_index.min() < 0 or self.user_index.max() >= len(lengths):
            raise ValueError(f"`samples.user_index` is out of range for {len(lengths)} sequences.")
        if (self.history_length < 0).any() or (self.history_length >= lengths[self.user_index]).any():
            raise ValueError("`samples.history_length` does not fit the sequences: were they built together?")
        has_history = self.history_length > 0
        last = self.offsets[self.user_index[has_history]] + self.history_length[has_history] - 1
        if (self.timestamps[last] >= self.candidate_timestamps[has_history]).any():
            raise ValueError("A history reaches the impression's timestamp (leakage): samples and sequences differ.")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        user = self.user_index[index]
        end = self.offsets[user] + self.history_length[index]
        start = max(end - self.max_history, self.offsets[user])
        item = {
            "input_ids": np.append(self.input_ids[start:end], self.candidate_ids[index]),
            "action_ids": np.append(self.action_ids[start:end], self.candidate_action_id),
            "timestamps": np.append(self.timestamps[start:end], self.candidate_timestamps[index]),
        }
        if self.surface_ids is not None:
            item["surface_ids"] = np.append(self.surface_ids[start:end], self.candidate_surface_ids[index])
        item["label"] = self.labels[index]
        item["user_index"] = user
        if self.candidate_ages is not None:
            item["candidate_age"] = self.candidate_ages[index]
        if self.side_feature_ids is not None:
            item["side_feature_ids"] = self.side_feature_ids[index]
        return item


def request_ids(user_index: np.ndarray, history_length: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """
    Request id of each impression, in sample order: consecutive impressions with the same user, history and
    timestamp are one request (ML-1M: several ratings in one second), and share one history encoding under DCAT.
    """
    keys = np.stack([user_index, history_length, timestamp], axis=1)
    new_request = np.ones(len(keys), dtype=bool)
    new_request[1:] = (keys[1:] != keys[:-1]).any(axis=1)
    return np.cumsum(new_request) - 1


def sample_requests(samples: pa.Table, limit: Optional[int], seed: int) -> pa.Table:
    """
    A seeded random subset of about `limit` impressions made of whole requests (see `request_ids`), in the original
    order; every kept row is a real impression. `limit=None` (or above the size) keeps everything.
    """
    if limit is None or limit >= samples.num_rows:
        return samples
    request = request_ids(*(samples[c].to_numpy() for c in ("user_index", "history_length", "timestamp")))
    sizes = np.bincount(request)
    chosen = np.random.default_rng(seed).permutation(len(sizes))
    chosen = chosen[: int(np.searchsorted(np.cumsum(sizes[chosen]), limit)) + 1]
    return samples.take(np.flatnonzero(np.isin(request, chosen)))


class CTRImpressionGroups(torch.utils.data.Dataset):
    """
    The impressions of a `CTRDataset` grouped by request: consecutive samples with the same user, history and
    timestamp (ML-1M: about 2 per group; several ratings in one second). Shuffling groups rather than samples keeps
    each request in one batch, so DCAT (`PinFMForCTR(..., deduplicate_histories=True)`) encodes its history once.
    An item is the list of the group's examples; batch them with [`collate_impression_groups`].
    """

    def __init__(self, dataset: CTRDataset):
        self.dataset = dataset
        request = request_ids(dataset.user_index, dataset.history_length, dataset.candidate_timestamps)
        self.starts = np.flatnonzero(np.diff(request, prepend=-1))
        self.ends = np.append(self.starts[1:], len(request))

    @property
    def mean_group_size(self) -> float:
        return len(self.dataset) / max(len(self.starts), 1)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> list[dict[str, np.ndarray]]:
        return [self.dataset[i] for i in range(self.starts[index], self.ends[index])]


def collate_impression_groups(collator):
    """Wrap an example collator so it batches lists of groups (from `CTRImpressionGroups`) as flat examples."""

    def collate(groups: list[list[dict[str, np.ndarray]]]):
        return collator([example for group in groups for example in group])

    return collate
