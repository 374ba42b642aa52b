"""Per-user time-ordered sequences (`datasets.Dataset` of Arrow lists), deterministic splits and atomic saving.

Grouping is done with pyarrow on the whole table (one stable sort, then per-user runs), never with `Dataset.map`,
which would split users across batch boundaries. Splits follow the HSTU leave-last-out protocol on ML-1M.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Union

import datasets
from datasets.fingerprint import generate_random_fingerprint
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from transformers.utils import logging

from ..io_utils import atomic_folder
from .events import SURFACE_COLUMN, EventTable


logger = logging.get_logger(__name__)

# Event column -> sequence column; item features keep their own names.
SEQUENCE_COLUMNS = {"item_id": "item_ids", "action": "actions", "timestamp": "timestamps", SURFACE_COLUMN: "surfaces"}


def _as_table(events: Union[EventTable, pa.Table]) -> pa.Table:
    return events.table if isinstance(events, EventTable) else events


def build_user_sequences(events: Union[EventTable, pa.Table]) -> datasets.Dataset:
    """
    Group events into one time-ordered row per user.

    Events with equal timestamps keep their order in the file (the sort is stable), so the result is
    deterministic. Rows are ordered by `user_id` (string order).

    Returns:
        `datasets.Dataset` with `user_id`, list columns `item_ids`, `actions`, `timestamps` (int64),
        `surfaces` when present, and one list column per item feature under the feature's own name.
    """
    table = _as_table(events)
    if table.num_rows == 0:
        raise ValueError("No events to group into sequences.")
    value_columns = [c for c in table.column_names if c != "user_id"]
    # Sort on each user's rank among the distinct ids rather than on the strings: same order, 2x faster.
    users = pc.dictionary_encode(table["user_id"].combine_chunks())
    user_rank = pc.take(pc.rank(users.dictionary, sort_keys="ascending"), users.indices)
    order = pc.sort_indices(  # stable: events with equal timestamps keep their file order
        pa.table({"user": user_rank, "timestamp": table["timestamp"]}),
        sort_keys=[("user", "ascending"), ("timestamp", "ascending")],
    )
    ordered = table.take(order).combine_chunks()
    # The rows are now contiguous per user, so each user's list is a run: cut at the run boundaries.
    # Same result as `group_by("user_id", use_threads=False).aggregate(list)`, which takes 0.75 s on ML-1M vs 0.05 s.
    ranks = pc.take(user_rank, order).to_numpy()
    starts = np.flatnonzero(np.diff(ranks)) + 1
    offsets = pa.array(np.concatenate([[0], starts, [len(ranks)]]).astype(np.int32))
    columns = {"user_id": ordered["user_id"].chunk(0).take(offsets[:-1])}
    for name in value_columns:
        columns[SEQUENCE_COLUMNS.get(name, name)] = pa.ListArray.from_arrays(offsets, ordered[name].chunk(0))
    # A random fingerprint: the default hashes every row (~0.2 s on ML-1M) and in-memory data is never cached.
    return datasets.Dataset(pa.table(columns), fingerprint=generate_random_fingerprint())


def sequence_table(sequences: Union[datasets.Dataset, pa.Table]) -> pa.Table:
    """A `pyarrow.Table` of per-user sequences, from a table or a `datasets.Dataset` (honouring `select`/`shuffle`)."""
    if isinstance(sequences, pa.Table):
        return sequences
    # The arrow formatter honours any indices mapping left by `select`/`shuffle`.
    return sequences.with_format("arrow")[:]


def _drop_last(table: pa.Table, n: int) -> pa.Table:
    """Remove the last `n` elements of every list column (every row must have at least `n` elements)."""
    if n == 0 or table.num_rows == 0:
        return table
    columns = {}
    for name, column in zip(table.column_names, table.columns):
        if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
            columns[name] = column
            continue
        # pc.list_slice takes one `stop` for all rows; per-row stops need an element mask over the flat values.
        lists = column.combine_chunks()
        offsets = lists.offsets.to_numpy().astype(np.int64)
        lengths = np.diff(offsets)
        position = np.arange(offsets[-1] - offsets[0]) - np.repeat(offsets[:-1] - offsets[0], lengths)
        keep = position < np.repeat(lengths - n, lengths)
        new_offsets = pa.array(np.concatenate([[0], np.cumsum(lengths - n)]), type=lists.offsets.type)
        array_class = pa.LargeListArray if pa.types.is_large_list(column.type) else pa.ListArray
        columns[name] = array_class.from_arrays(new_offsets, lists.flatten().filter(pa.array(keep)))
    return pa.table(columns)


def split_rules(train_holdout: int) -> dict[str, tuple[int, int]]:
    """Leave-last-out: each split's `(events dropped from the end, events a user needs)`."""
    return {"train": (train_holdout, train_holdout + 1), "valid": (1, 3), "test": (0, 2)}


def leave_last_out_split(
    sequences: Union[datasets.Dataset, pa.Table], *, train_holdout: int = 1
) -> datasets.DatasetDict:
    """
    Split per-user sequences with the HSTU leave-last-out protocol.

    - `test`: the full sequence; the evaluator predicts its last event from the rest (needs 2 events).
    - `valid`: the sequence minus its last event; the evaluator predicts the second-to-last (needs 3 events).
    - `train`: the sequence minus its last `train_holdout` events (needs `train_holdout + 1` events). The HSTU
      default 1 trains on the validation targets; 2 gives a validation whose targets are never trained on.

    Users too short for a split are left out of it; the counts are logged and stored in the returned
    `DatasetDict`'s `num_users_left_out` attribute (`{"train": ..., "valid": ..., "test": ...}`). When no user is
    long enough for `train`, a `ValueError` says so: an empty training split would only fail later, inside torch.
    """
    if train_holdout < 1:
        raise ValueError(f"`train_holdout` ({train_holdout}) must be at least 1.")
    table = sequence_table(sequences)
    lengths = pc.list_value_length(table["item_ids"])
    longest = pc.max(lengths).as_py() or 0
    if longest < train_holdout + 1:
        raise ValueError(
            f"No user has {train_holdout + 1} or more events, so leave-last-out leaves nothing to train on: "
            f"{table.num_rows:,} users, {pc.sum(lengths).as_py() or 0:,} events, at most {longest} per user "
            f"(train_holdout={train_holdout}). Give a log with user histories, or check the user_id column."
        )
    splits, left_out = {}, {}
    for split, (drop, min_length) in split_rules(train_holdout).items():
        long_enough = pc.greater_equal(lengths, min_length)
        kept = table.filter(long_enough)
        left_out[split] = table.num_rows - kept.num_rows
        if left_out[split]:
            logger.warning(
                f"`{split}` split: left out {left_out[split]} of {table.num_rows} users with fewer than "
                f"{min_length} events."
            )
        splits[split] = datasets.Dataset(_drop_last(kept, drop), fingerprint=generate_random_fingerprint())
    result = datasets.DatasetDict(splits)
    result.num_users_left_out = left_out
    logger.info(f"Leave-last-out split: {', '.join(f'{k} {len(v):,} users' for k, v in result.items())}.")
    return result


def next_item_eval_dataset(
    split: Union[datasets.Dataset, pa.Table], tokenizer: Any, *, max_length: int, max_users: Optional[int] = None
) -> datasets.Dataset:
    """
    A `valid`/`test` split of `leave_last_out_split`, encoded for next-item evaluation: each user's last event is the
    target (`target_ids`, its time `target_timestamps`), the `max_length` events before it are the input. `tokenizer`
    is the model's `PinFMTokenizer`; `max_users` keeps the first N users.
    """
    if max_users is not None:
        split = split.select(range(min(max_users, len(split)))) if isinstance(split, datasets.Dataset) else split.slice(0, max_users)
    return datasets.Dataset(tokenizer.encode_sequences(split, max_length=max_length, hold_out_last=True))


def quantile_timestamp(events: Union[EventTable, pa.Table], quantile: float) -> int:
    """
    The event timestamp at `quantile` (in (0, 1)), rounded up to a real event time ("higher" interpolation).

    Shared by `time_split` and the CTR split so that both cut event logs and impressions at the same time.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"`quantile` ({quantile}) must be strictly between 0 and 1.")
    return pc.quantile(_as_table(events)["timestamp"], q=quantile, interpolation="higher")[0].as_py()


def time_split(
    events: Union[EventTable, pa.Table],
    *,
    cut_timestamp: Optional[int] = None,
    quantile: Optional[float] = None,
) -> tuple[Union[EventTable, pa.Table], Union[EventTable, pa.Table], int]:
    """
    Split events at one global time: `before` has `timestamp < cut`, `after` has `timestamp >= cut`.

    Give exactly one of `cut_timestamp` (unix seconds) or `quantile` (in (0, 1); the cut is the event
    timestamp at that quantile, so about that fraction of events falls before it, fewer with ties; a
    `ValueError` when ties leave none before it).

    Returns:
        `(before, after, cut)`, with `before`/`after` of the same type as `events`.
    """
    if (cut_timestamp is None) == (quantile is None):
        raise ValueError("Pass exactly one of `cut_timestamp` and `quantile`.")
    table = _as_table(events)
    cut = quantile_timestamp(table, quantile) if quantile is not None else int(cut_timestamp)
    before_mask = pc.less(table["timestamp"], cut)
    parts = (table.filter(before_mask), table.filter(pc.invert(before_mask)))
    if quantile is not None and parts[0].num_rows == 0:
        # The quantile fell on the earliest time: every event shares it (e.g. a log with one timestamp, or
        # dates without a time of day), and "before" would be silently empty.
        raise ValueError(
            f"Time split at quantile {quantile}: no event is before the cut {cut}; {parts[1].num_rows:,} events "
            f"are at or after it, {pc.sum(pc.equal(table['timestamp'], cut)).as_py():,} of them exactly at it."
        )
    logger.info(f"Time split at {cut}: {parts[0].num_rows:,} events before, {parts[1].num_rows:,} from then on.")
    if isinstance(events, EventTable):
        parts = tuple(
            replace(events, table=part, source=f"{events.source} [{label} {cut}]", num_rows_read=part.num_rows,
                    num_duplicates_dropped=0)
            for part, label in zip(parts, ("timestamp <", "timestamp >="))
        )
    return parts[0], parts[1], cut


def save_sequences(dataset: Union[datasets.Dataset, datasets.DatasetDict], path: Union[str, Path]) -> None:
    """`save_to_disk`, atomically: a crash never leaves a half-written folder at `path`; an existing one is replaced."""
    with atomic_folder(path) as tmp:
        dataset.save_to_disk(str(tmp))


def load_sequences(path: Union[str, Path]) -> Union[datasets.Dataset, datasets.DatasetDict]:
    """Load what `save_sequences` wrote."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No saved sequences at {path}")
    return datasets.load_from_disk(str(path))
