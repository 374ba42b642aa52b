"""The canonical event schema, its validation and the `EventTable` container.

Every loader ends here, so the model side can rely on one schema: `user_id`, `item_id`, `action` (strings),
`timestamp` (int64 unix seconds), an optional `surface` (string) and optional item side features (strings).
Validation is vectorised with `pyarrow.compute`: it finds the first bad row with one kernel call per check and
only then formats a one-line message naming the file, line and column.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from transformers.utils import logging


logger = logging.get_logger(__name__)

EVENT_COLUMNS = ("user_id", "item_id", "action", "timestamp")
SURFACE_COLUMN = "surface"
# Floats are exact up to 2**53; larger "timestamps" are corrupt values, not dates.
_MAX_TIMESTAMP = 2**53
_NUMBER_REGEX = r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$"


class EventValidationError(ValueError):
    """Raised for bad event input; the message is one line naming the source, line (or row) and column."""


def _location(source: str, row: int, line_offset: Optional[int]) -> str:
    # `line_offset` is the physical 1-based line of row 0 (2 for a file with a header line).
    where = f"row {row}" if line_offset is None else f"line {row + line_offset}"
    return f"{source}, {where}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def raise_at(
    source: str, row: int, column: str, message: str, *, line_offset: Optional[int] = None
) -> None:
    """Raise an `EventValidationError` located at `row` (0-based) of `source`."""
    raise EventValidationError(f"{_location(source, row, line_offset)}, column '{column}': {message}")


def first_true(mask: pa.Array | pa.ChunkedArray) -> int:
    """Index of the first true value of a boolean mask (nulls count as false), or -1."""
    return pc.index(mask, True).as_py()


def check_mask(
    bad: pa.Array | pa.ChunkedArray,
    values: pa.Array | pa.ChunkedArray,
    *,
    source: str,
    column: str,
    problem: str,
    line_offset: Optional[int] = None,
) -> None:
    """Raise for the first row where `bad` is true: "value '<v>' <problem>"."""
    row = first_true(bad)
    if row >= 0:
        raise_at(source, row, column, f"value {_short(values[row].as_py())} {problem}", line_offset=line_offset)


def _check_not_null(col, *, source, column, line_offset) -> None:
    row = first_true(pc.is_null(col))
    if row >= 0:
        raise_at(source, row, column, "value is missing", line_offset=line_offset)


def _as_string(col: pa.ChunkedArray, *, source: str, column: str) -> pa.ChunkedArray:
    if pa.types.is_string(col.type):
        return col
    if pa.types.is_large_string(col.type) or pa.types.is_integer(col.type) or pa.types.is_dictionary(col.type):
        return pc.cast(col, pa.string())
    raise EventValidationError(f"{source}, column '{column}': expected strings or integers, got {col.type}")


def _validate_id(col, *, source, column, line_offset) -> pa.ChunkedArray:
    col = _as_string(col, source=source, column=column)
    _check_not_null(col, source=source, column=column, line_offset=line_offset)
    empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0)
    row = first_true(empty)
    if row >= 0:
        raise_at(source, row, column, f"value {_short(col[row].as_py())} is empty", line_offset=line_offset)
    return col


def _validate_timestamp(col, *, source, line_offset) -> pa.ChunkedArray:
    kw = {"source": source, "column": "timestamp", "line_offset": line_offset}
    _check_not_null(col, **kw)
    raw = col  # messages quote the value as it was given
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        check_mask(pc.invert(pc.match_substring_regex(col, _NUMBER_REGEX)), raw, problem="is not a number", **kw)
        col = pc.cast(pc.utf8_trim_whitespace(col), pa.float64())
    elif not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise EventValidationError(f"{source}, column 'timestamp': expected numbers, got {col.type}")
    if pa.types.is_floating(col.type):
        check_mask(pc.invert(pc.is_finite(col)), raw, problem="is not a finite number", **kw)
    check_mask(pc.less(col, 0), raw, problem="is negative", **kw)
    check_mask(pc.greater_equal(col, _MAX_TIMESTAMP), raw, problem="is too large for unix seconds", **kw)
    if pa.types.is_floating(col.type):
        # Non-integral seconds are accepted and floored: sub-second precision is not used downstream.
        col = pc.floor(col)
    return pc.cast(col, pa.int64())


def validate_events(
    table: pa.Table,
    *,
    source: str,
    allowed_actions: Optional[Iterable[str]] = None,
    line_offset: Optional[int] = None,
    item_features: Optional[Sequence[str]] = None,
) -> pa.Table:
    """
    Check `table` against the event schema and return it in canonical form.

    Args:
        table (`pa.Table`): events with at least the columns of `EVENT_COLUMNS`.
        source (`str`): name of the file (or data set) for error messages.
        allowed_actions (`Iterable[str]`, *optional*): when given, any other action name is an error.
        line_offset (`int`, *optional*): physical 1-based line of row 0 in `source` (2 when the file has a
            header); when `None`, errors name the 0-based `row` instead.
        item_features (`Sequence[str]`, *optional*): feature columns to keep; defaults to every column that is
            neither an event column nor `surface`.

    Returns:
        `pa.Table` with columns `user_id`, `item_id`, `action`, `timestamp` (int64), then `surface` if present,
        then the feature columns, all strings. Timestamps given as floats are floored to whole seconds.
    """
    missing = [c for c in EVENT_COLUMNS if c not in table.column_names]
    if missing:
        raise EventValidationError(
            f"{source}: missing column(s) {', '.join(repr(c) for c in missing)}; found {table.column_names}"
        )
    if item_features is None:
        item_features = [c for c in table.column_names if c not in EVENT_COLUMNS and c != SURFACE_COLUMN]
    missing = [c for c in item_features if c not in table.column_names]
    if missing:
        raise EventValidationError(f"{source}: missing item feature column(s) {', '.join(map(repr, missing))}")
    if table.num_rows == 0:
        raise EventValidationError(f"{source}: no events (zero rows)")

    kw = {"source": source, "line_offset": line_offset}
    columns = {
        "user_id": _validate_id(table["user_id"], column="user_id", **kw),
        "item_id": _validate_id(table["item_id"], column="item_id", **kw),
        "action": _validate_id(table["action"], column="action", **kw),
        "timestamp": _validate_timestamp(table["timestamp"], **kw),
    }
    if allowed_actions is not None:
        allowed = sorted(set(allowed_actions))
        check_mask(
            pc.invert(pc.is_in(columns["action"], value_set=pa.array(allowed, pa.string()))), columns["action"],
            column="action", problem=f"is not a known action (allowed: {', '.join(allowed)})", **kw,
        )
    if SURFACE_COLUMN in table.column_names:
        columns[SURFACE_COLUMN] = _validate_id(table[SURFACE_COLUMN], column=SURFACE_COLUMN, **kw)
    for name in item_features:
        # Features may be null (an item missing from a side file); they are still strings.
        col = table[name]
        if not pa.types.is_string(col.type):
            col = pc.cast(col, pa.string())
        columns[name] = col
    return pa.table(columns)


def drop_duplicate_events(table: pa.Table, *, source: str) -> tuple[pa.Table, int]:
    """Drop exact duplicate rows (all columns equal), keeping the first occurrence and the row order."""
    if table.num_rows == 0:
        return table, 0
    # Grouping on dictionary codes is ~8x faster than on the strings themselves (0.15 s vs 1 s on ML-1M).
    codes = {
        name: col if pa.types.is_integer(col.type) else pc.dictionary_encode(col.combine_chunks()).indices
        for name, col in zip(table.column_names, table.columns)
    }
    codes["__row"] = pa.array(np.arange(table.num_rows, dtype=np.int64))
    first = pa.table(codes).group_by(table.column_names, use_threads=False).aggregate([("__row", "min")])["__row_min"]
    num_dropped = table.num_rows - len(first)
    if num_dropped == 0:
        return table, 0
    logger.warning(f"{source}: dropped {num_dropped} exact duplicate event(s) out of {table.num_rows}.")
    return table.take(first.sort()), num_dropped


@dataclass
class EventTable:
    """
    A validated event log in the canonical schema (see `validate_events`).

    Args:
        table (`pa.Table`): the events, in file order.
        source (`str`): where they came from (a path or a data set name).
        num_rows_read (`int`): rows read from the source before duplicates were dropped.
        num_duplicates_dropped (`int`): exact duplicate events that were dropped.
        item_features (`tuple[str, ...]`): names of the item side-feature columns.
    """

    table: pa.Table
    source: str
    num_rows_read: int
    num_duplicates_dropped: int = 0
    item_features: tuple[str, ...] = ()

    @property
    def has_surface(self) -> bool:
        return SURFACE_COLUMN in self.table.column_names

    def __len__(self) -> int:
        return self.table.num_rows

    def summary(self) -> dict[str, Any]:
        """Counts of events, distinct users and items, and events per action."""
        counts = pc.value_counts(self.table["action"]).to_pylist()
        return {
            "events": self.table.num_rows,
            "users": pc.count_distinct(self.table["user_id"]).as_py(),
            "items": pc.count_distinct(self.table["item_id"]).as_py(),
            "actions": {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: c["values"])},
        }

    def describe(self) -> str:
        """One line for logs."""
        s = self.summary()
        return (
            f"{self.source}: {s['events']:,} events, {s['users']:,} users, {s['items']:,} items, "
            f"{len(s['actions'])} actions; {self.num_duplicates_dropped:,} duplicates dropped"
        )


def make_event_table(
    table: pa.Table,
    *,
    source: str,
    allowed_actions: Optional[Iterable[str]] = None,
    line_offset: Optional[int] = None,
    item_features: Optional[Sequence[str]] = None,
) -> EventTable:
    """Validate `table`, drop exact duplicates (counted and logged) and wrap the result in an `EventTable`."""
    valid = validate_events(
        table, source=source, allowed_actions=allowed_actions, line_offset=line_offset, item_features=item_features
    )
    deduplicated, num_dropped = drop_duplicate_events(valid, source=source)
    features = tuple(c for c in valid.column_names if c not in EVENT_COLUMNS and c != SURFACE_COLUMN)
    events = EventTable(deduplicated, source, table.num_rows, num_dropped, features)
    logger.info(events.describe())
    return events
