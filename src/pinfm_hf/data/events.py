"""The canonical event schema, its validation and the `EventTable` container.

Every loader ends here, so the model side can rely on one schema: `user_id`, `item_id`, `action` (strings),
`timestamp` (int64 unix seconds), an optional `surface` (string) and optional item side features (strings).
Timestamps in milliseconds, microseconds or nanoseconds are recognised by their magnitude (or named with
`timestamp_unit`) and converted to seconds, so that time buckets never shift silently.
Validation is vectorised with `pyarrow.compute`: it finds the first bad row with one kernel call per check and
only then formats a one-line message naming the file, line and column.
"""

from __future__ import annotations

import re
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
TIMESTAMP_UNITS = ("auto", "s", "ms", "us", "ns")
_UNIT_FACTORS = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}
_UNIT_NAMES = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}
# Unix seconds below 1e11 reach the year 5138, and each finer unit's range starts where the coarser one ends
# (1e11 ms is 1973), so the magnitude of a post-1973 date names its unit.
_SECONDS_LIMIT = 10**11
NUMBER_REGEX = r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$"
_INTEGER_REGEX = r"^\s*[+-]?\d+\s*$"
# ISO 8601 dates as `datetime.isoformat`, pandas and SQL write them; a zone suffix is either on every value or on none.
_DATE_REGEX = r"^\s*\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?\s*$"
_ZONED_REGEX = r"(Z|[+-]\d{2}:?\d{2})\s*$"


class EventValidationError(ValueError):
    """Raised for bad event input; the message is one line naming the source, line (or row) and column."""


def _where(row: int, line_offset: Optional[int]) -> str:
    # `line_offset` is the physical 1-based line of row 0 (2 for a file with a header line).
    return f"row {row}" if line_offset is None else f"line {row + line_offset}"


def _location(source: str, row: int, line_offset: Optional[int]) -> str:
    return f"{source}, {_where(row, line_offset)}"


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


def check_timestamp_unit(timestamp_unit: str) -> str:
    """Return `timestamp_unit` if it is one of `TIMESTAMP_UNITS`, else raise a `ValueError` naming the flag."""
    if timestamp_unit not in TIMESTAMP_UNITS:
        choices = ", ".join(repr(u) for u in TIMESTAMP_UNITS)
        raise ValueError(f"`timestamp_unit` ({timestamp_unit!r}) must be one of {choices} (--timestamp_unit).")
    return timestamp_unit


def _as_string(col, *, source: str, column: str, line_offset: Optional[int]) -> pa.ChunkedArray:
    kw = {"source": source, "column": column, "line_offset": line_offset}
    if pa.types.is_string(col.type):
        return col
    if pa.types.is_large_string(col.type) or pa.types.is_integer(col.type) or pa.types.is_dictionary(col.type):
        return pc.cast(col, pa.string())
    if pa.types.is_floating(col.type):
        # pandas stores integer ids as floats once a column has a missing value; 1.0 must become "1", not "1.0".
        check_mask(pc.is_nan(col), col, problem="is missing (NaN)", **kw)
        check_mask(pc.invert(pc.is_finite(col)), col, problem="is not an id", **kw)
        check_mask(pc.not_equal(pc.floor(col), col), col, problem="is not an integer id", **kw)
        return pc.cast(pc.cast(col, pa.int64()), pa.string())
    hint = ": flatten it to one value per row" if pa.types.is_nested(col.type) else ""
    raise EventValidationError(f"{source}, column '{column}': expected strings or integers, got {col.type}{hint}")


def _integral_float_ids(col: pa.ChunkedArray, *, source: str, column: str) -> pa.ChunkedArray:
    # A float export writes the integer id 1 as "1.0": when every id is an integer so written or plain, read
    # "1.0" as "1" so that both spellings name one user or item.
    as_float = pc.match_substring_regex(col, r"^\s*[+-]?\d+\.0*\s*$")
    if not pc.any(as_float).as_py():
        return col
    if not pc.all(pc.or_(as_float, pc.match_substring_regex(col, _INTEGER_REGEX))).as_py():
        return col
    fixed = pc.replace_substring_regex(col, r"\.0*(\s*)$", r"\1")
    row = first_true(as_float)
    logger.warning(
        f"{source}, column '{column}': integer ids written as floats (e.g. {col[row].as_py()!r}); read as "
        f"{fixed[row].as_py()!r} so that both spellings are one id."
    )
    return fixed


def _validate_id(col, *, source, column, line_offset) -> pa.ChunkedArray:
    _check_not_null(col, source=source, column=column, line_offset=line_offset)
    was_string = pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
    col = _as_string(col, source=source, column=column, line_offset=line_offset)
    empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0)
    row = first_true(empty)
    if row >= 0:
        raise_at(source, row, column, f"value {_short(col[row].as_py())} is empty", line_offset=line_offset)
    check_mask(
        pc.match_substring(col, "\x00"), col, source=source, column=column, line_offset=line_offset,
        problem="holds a NUL byte (a binary or UTF-16 file?)",
    )
    if was_string and column in ("user_id", "item_id"):
        col = _integral_float_ids(col, source=source, column=column)
    return col


def _unit_of(value: float) -> Optional[str]:
    """The coarsest unit in which `value` is a date before the year 5138, or `None` for no unit."""
    for unit, factor in _UNIT_FACTORS.items():
        if value < _SECONDS_LIMIT * factor:
            return unit
    return None


def _coarser_limit(unit: str) -> int:
    """Smallest value whose unit is `unit` rather than a coarser one (0 for seconds)."""
    units = list(_UNIT_FACTORS)
    index = units.index(unit)
    return 0 if index == 0 else _SECONDS_LIMIT * _UNIT_FACTORS[units[index - 1]]


def _at_least(col, value: int):
    """Mask of `col >= value`, exact for integer columns (comparing with a float would cast values above 2**53)."""
    if not pa.types.is_integer(col.type):
        return pc.greater_equal(col, float(value))
    if value > np.iinfo(np.int64).max:
        return pc.not_equal(col, col)  # no int64 reaches it
    return pc.greater_equal(col, pa.scalar(value, pa.int64()))


def _resolve_unit(col, raw, timestamp_unit: str, *, source: str, line_offset: Optional[int]) -> str:
    """The unit of non-negative numeric `col`: checked against an explicit `timestamp_unit`, or told by magnitude."""
    kw = {"source": source, "column": "timestamp", "line_offset": line_offset}
    low, high = (v.as_py() for v in pc.min_max(col).values())
    low_unit, high_unit = _unit_of(low), _unit_of(high)
    if high_unit is None:
        check_mask(_at_least(col, _SECONDS_LIMIT * _UNIT_FACTORS["ns"]), raw, **kw,
                   problem="is too large for a unix time in seconds, milliseconds, microseconds or nanoseconds")
    high_row = first_true(pc.equal(col, high))
    high_text = f"value {_short(raw[high_row].as_py())} ({_where(high_row, line_offset)})"
    if timestamp_unit == "auto":
        if low_unit != high_unit:
            row = first_true(pc.invert(_at_least(col, _coarser_limit(high_unit))))
            raise_at(
                source, row, "timestamp",
                f"value {_short(raw[row].as_py())} looks like unix {_UNIT_NAMES[_unit_of(col[row].as_py())]} but "
                f"{high_text} looks like unix {_UNIT_NAMES[high_unit]}: units are mixed; set --timestamp_unit "
                "(`timestamp_unit=`) to the column's unit",
                line_offset=line_offset,
            )
        if high_unit != "s":
            logger.warning(
                f"{source}, column 'timestamp': values such as {_short(raw[high_row].as_py())} are unix "
                f"{_UNIT_NAMES[high_unit]}; converted to seconds. Pass --timestamp_unit {high_unit} "
                f"(`timestamp_unit='{high_unit}'`) to silence this notice."
            )
        return high_unit
    limit = _SECONDS_LIMIT * _UNIT_FACTORS[timestamp_unit]
    if high >= limit:
        hint = f"it looks like unix {_UNIT_NAMES[high_unit]}: set --timestamp_unit {high_unit} or auto"
        check_mask(
            _at_least(col, limit), raw, **kw,
            problem=f"is too large for unix {_UNIT_NAMES[timestamp_unit]} (after the year 5138) with --timestamp_unit "
            f"{timestamp_unit}; {hint}",
        )
    if high_unit != timestamp_unit and low_unit == high_unit and low >= 10**8 * _UNIT_FACTORS[high_unit]:
        # Every value is a post-1973 date in a coarser unit: as `timestamp_unit` they would all fall before 1973.
        logger.warning(
            f"{source}, column 'timestamp': with --timestamp_unit {timestamp_unit} every event is before 1973, but "
            f"{high_text} looks like unix {_UNIT_NAMES[high_unit]}; check --timestamp_unit."
        )
    return timestamp_unit


def _dates_to_seconds(col, *, source: str, line_offset: Optional[int]) -> Optional[pa.ChunkedArray]:
    """Unix seconds of a string column of ISO 8601 dates, or `None` when it holds no date at all."""
    kw = {"source": source, "column": "timestamp", "line_offset": line_offset}
    is_date = pc.match_substring_regex(col, _DATE_REGEX)
    first = first_true(is_date)
    if first < 0:
        return None
    first_text = f"{_short(col[first].as_py())} ({_where(first, line_offset)})"
    check_mask(
        pc.invert(is_date), col, **kw,
        problem=f"is not an ISO 8601 date like {first_text}: write every timestamp as a date or every one as a number",
    )
    zoned = pc.match_substring_regex(col, _ZONED_REGEX)
    has_zone = zoned[0].as_py()
    check_mask(pc.not_equal(zoned, has_zone), col, **kw,
               problem=f"{'has no' if has_zone else 'has a'} time zone but {_short(col[0].as_py())} "
               f"({_where(0, line_offset)}) {'has one' if has_zone else 'has none'}: give every date a zone or none")
    trimmed = pc.utf8_trim_whitespace(col)
    try:
        # ns parses up to nine fraction digits; its range (1677..2262) holds any event log.
        parsed = pc.cast(trimmed, pa.timestamp("ns", tz="UTC") if has_zone else pa.timestamp("ns"))
    except pa.ArrowInvalid as e:
        match = re.search(r"Failed to parse string: '([^']*)'", str(e))
        row = pc.index(trimmed, match.group(1)).as_py() if match else -1
        if row < 0:
            raise EventValidationError(f"{source}, column 'timestamp': {str(e).splitlines()[0]}") from None
        raise_at(source, row, "timestamp", f"value {_short(col[row].as_py())} is not a valid date",
                 line_offset=line_offset)
    nanoseconds = pc.cast(parsed, pa.int64())
    check_mask(pc.less(nanoseconds, 0), col, problem="is before 1970", **kw)
    if not has_zone:
        logger.warning(
            f"{source}, column 'timestamp': dates without a time zone (e.g. {col[0].as_py()!r}) are read as UTC."
        )
    return pc.divide(nanoseconds, _UNIT_FACTORS["ns"])


def _validate_timestamp(col, *, source, line_offset, timestamp_unit: str = "auto") -> pa.ChunkedArray:
    kw = {"source": source, "column": "timestamp", "line_offset": line_offset}
    _check_not_null(col, **kw)
    raw = col  # messages quote the value as it was given
    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        # A typed column carries its own unit; `timestamp_unit` describes plain numbers only.
        if pa.types.is_date(col.type):
            col = pc.cast(col, pa.timestamp("s"))
        values = pc.cast(col, pa.int64())
        check_mask(pc.less(values, 0), raw, problem="is before 1970", **kw)
        return pc.divide(values, _UNIT_FACTORS[col.type.unit])
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        is_number = pc.match_substring_regex(col, NUMBER_REGEX)
        if not pc.all(is_number).as_py():
            dates = _dates_to_seconds(col, source=source, line_offset=line_offset)
            if dates is not None:
                return dates
            check_mask(pc.invert(is_number), raw, problem="is not a number", **kw)
        col = pc.utf8_trim_whitespace(col)
        numbers = None
        if pc.all(pc.match_substring_regex(col, _INTEGER_REGEX)).as_py():
            try:  # int64 keeps nanosecond values exact; beyond int64 they are floats, then too large
                numbers = pc.cast(col, pa.int64())
            except pa.ArrowInvalid:
                pass
        col = numbers if numbers is not None else pc.cast(col, pa.float64())
    elif not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise EventValidationError(f"{source}, column 'timestamp': expected numbers, got {col.type}")
    if pa.types.is_floating(col.type):
        check_mask(pc.invert(pc.is_finite(col)), raw, problem="is not a finite number", **kw)
    check_mask(pc.less(col, 0), raw, problem="is negative", **kw)
    unit = _resolve_unit(col, raw, timestamp_unit, source=source, line_offset=line_offset)
    factor = _UNIT_FACTORS[unit]
    if pa.types.is_floating(col.type):
        # Non-integral seconds are accepted and floored: sub-second precision is not used downstream.
        return pc.cast(pc.floor(pc.divide(col, float(factor))), pa.int64())
    col = pc.cast(col, pa.int64())
    # Values are non-negative, so integer division floors.
    return pc.divide(col, factor) if factor > 1 else col


def validate_events(
    table: pa.Table,
    *,
    source: str,
    allowed_actions: Optional[Iterable[str]] = None,
    line_offset: Optional[int] = None,
    item_features: Optional[Sequence[str]] = None,
    timestamp_unit: str = "auto",
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
        timestamp_unit (`str`, *optional*, defaults to `"auto"`): unit of numeric timestamps, one of `"s"`,
            `"ms"`, `"us"`, `"ns"`, or `"auto"` to tell it from the magnitude (converting with a logged notice and
            refusing a column whose magnitudes mix units). An explicit unit is checked against the values. Arrow
            `timestamp`/`date` columns use their own unit; strings holding ISO 8601 dates are parsed (UTC when they
            carry no zone).

    Returns:
        `pa.Table` with columns `user_id`, `item_id`, `action`, `timestamp` (int64 unix seconds), then `surface` if
        present, then the feature columns, all strings. Timestamps given as floats are floored to whole seconds.
    """
    check_timestamp_unit(timestamp_unit)
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
        "timestamp": _validate_timestamp(table["timestamp"], timestamp_unit=timestamp_unit, **kw),
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

    @property
    def max_timestamp(self) -> int:
        """The last event's time (unix seconds): the model's `pretraining_max_timestamp`."""
        return int(pc.max(self.table["timestamp"]).as_py())

    def summary(self) -> dict[str, Any]:
        """Counts of events, distinct users and items, and events per action."""
        counts = pc.value_counts(self.table["action"]).to_pylist()
        return {
            "events": self.table.num_rows,
            "users": pc.count_distinct(self.table["user_id"]).as_py(),
            "items": pc.count_distinct(self.table["item_id"]).as_py(),
            "actions": {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: c["values"])},
        }

    def repeat_share(self) -> float:
        """
        Share of events whose item the same user already had: 0 for ratings and reviews (MovieLens, Amazon), large
        for clicks and views (Taobao). It decides whether evaluation may drop the history's items from the ranking.
        """
        if self.table.num_rows == 0:
            return 0.0
        pairs = self.table.select(["user_id", "item_id"]).group_by(["user_id", "item_id"], use_threads=False).aggregate([])
        return 1.0 - pairs.num_rows / self.table.num_rows

    def describe(self) -> str:
        """One line for logs."""
        s = self.summary()
        return (
            f"{self.source}: {s['events']:,} events, {s['users']:,} users, {s['items']:,} items, "
            f"{len(s['actions'])} actions; {self.num_duplicates_dropped:,} duplicates dropped"
        )


def make_event_table(table: pa.Table, *, source: str, **validation: Any) -> EventTable:
    """
    Validate `table` (`validate_events`, which takes `source` and the `validation` options: `allowed_actions`,
    `line_offset`, `item_features`, `timestamp_unit`), drop exact duplicates (counted and logged) and wrap the result
    in an `EventTable`.
    """
    valid = validate_events(table, source=source, **validation)
    deduplicated, num_dropped = drop_duplicate_events(valid, source=source)
    features = tuple(c for c in valid.column_names if c not in EVENT_COLUMNS and c != SURFACE_COLUMN)
    events = EventTable(deduplicated, source, table.num_rows, num_dropped, features)
    logger.info(events.describe())
    return events
