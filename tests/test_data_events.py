import logging

import pyarrow as pa
import pytest

from pinfm_hf.data import EVENT_COLUMNS, EventTable, EventValidationError, make_event_table, validate_events


def events(**overrides):
    columns = {
        "user_id": ["u1", "u1", "u2"],
        "item_id": ["a", "b", "a"],
        "action": ["click", "buy", "click"],
        "timestamp": ["10", "20", "30"],
    }
    columns.update(overrides)
    return pa.table(columns)


def test_canonical_schema_and_casts():
    table = validate_events(events(timestamp=["10", " 20 ", "3e1"], genre=["x", None, "y"]), source="t.csv")
    assert table.column_names == [*EVENT_COLUMNS, "genre"]
    assert table.schema.field("timestamp").type == pa.int64()
    assert table["timestamp"].to_pylist() == [10, 20, 30]
    assert table["genre"].to_pylist() == ["x", None, "y"]


def test_integer_ids_and_float_timestamps():
    table = validate_events(events(user_id=[1, 1, 2], timestamp=[978300760.0, 978300761.9, 5.0]), source="t")
    assert table["user_id"].to_pylist() == ["1", "1", "2"]
    # Non-integral seconds are floored.
    assert table["timestamp"].to_pylist() == [978300760, 978300761, 5]


def test_missing_columns_are_named():
    with pytest.raises(EventValidationError, match=r"^t\.csv: missing column\(s\) 'action', 'timestamp'"):
        validate_events(events().drop(["action", "timestamp"]), source="t.csv")


def test_empty_input():
    with pytest.raises(EventValidationError, match=r"t\.csv: no events \(zero rows\)"):
        validate_events(events().slice(0, 0), source="t.csv")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"user_id": ["u1", "", "u2"]}, r"t\.csv, line 3, column 'user_id': value '' is empty"),
        ({"user_id": ["u1", "u1", None]}, r"t\.csv, line 4, column 'user_id': value is missing"),
        ({"item_id": ["a", "  ", "a"]}, r"t\.csv, line 3, column 'item_id': value '  ' is empty"),
        ({"item_id": [None, "b", "a"]}, r"t\.csv, line 2, column 'item_id': value is missing"),
        ({"timestamp": ["10", "abc", "30"]}, r"t\.csv, line 3, column 'timestamp': value 'abc' is not a number"),
        ({"timestamp": ["10", "20", None]}, r"t\.csv, line 4, column 'timestamp': value is missing"),
        ({"timestamp": ["10", "-5", "30"]}, r"t\.csv, line 3, column 'timestamp': value '-5' is negative"),
        ({"timestamp": [10, 20, -1]}, r"t\.csv, line 4, column 'timestamp': value -1 is negative"),
        ({"timestamp": [1.0, float("nan"), 2.0]}, r"line 3, column 'timestamp': value nan is not a finite number"),
        ({"timestamp": ["1", "2", "1e20"]}, r"line 4, column 'timestamp': value '1e20' is too large"),
    ],
)
def test_bad_values_name_line_and_column(overrides, expected):
    with pytest.raises(EventValidationError, match=expected):
        validate_events(events(**overrides), source="t.csv", line_offset=2)


def test_row_is_named_without_line_offset():
    with pytest.raises(EventValidationError, match=r"^data, row 1, column 'timestamp': value 'x' is not a number$"):
        validate_events(events(timestamp=["1", "x", "3"]), source="data")


def test_unknown_action():
    with pytest.raises(EventValidationError, match=r"t, row 1, column 'action': value 'buy' is not a known action"):
        validate_events(events(), source="t", allowed_actions=["click"])
    assert validate_events(events(), source="t", allowed_actions=["click", "buy"]).num_rows == 3


def test_null_surface_is_an_error():
    with pytest.raises(EventValidationError, match=r"row 2, column 'surface': value is missing"):
        validate_events(events(surface=["home", "search", None]), source="t")


def test_error_message_is_one_line():
    with pytest.raises(EventValidationError) as info:
        validate_events(events(timestamp=["1", "x" * 500, "3"]), source="t")
    assert "\n" not in str(info.value) and len(str(info.value)) < 200


def test_duplicates_are_dropped_counted_and_logged(caplog):
    table = events(user_id=["u1", "u1", "u1"], item_id=["a", "a", "a"], action=["click"] * 3,
                   timestamp=["10", "10", "11"])
    with caplog.at_level(logging.WARNING):
        result = make_event_table(table, source="t.csv")
    assert "t.csv: dropped 1 exact duplicate event(s) out of 3" in caplog.text
    assert isinstance(result, EventTable)
    assert (len(result), result.num_rows_read, result.num_duplicates_dropped) == (2, 3, 1)
    assert result.table["timestamp"].to_pylist() == [10, 11]  # first occurrence kept, order kept


def test_rows_differing_only_in_a_feature_are_kept():
    table = events(user_id=["u1", "u1", "u1"], item_id=["a"] * 3, action=["c"] * 3, timestamp=["1"] * 3,
                   genre=["x", None, "y"])
    result = make_event_table(table, source="t")
    assert result.num_duplicates_dropped == 0 and len(result) == 3


def test_event_table_summary_and_describe():
    result = make_event_table(events(surface=["home", "home", "search"], genre=["g", "h", "g"]), source="t.csv")
    assert result.has_surface and result.item_features == ("genre",)
    assert result.summary() == {"events": 3, "users": 2, "items": 2, "actions": {"buy": 1, "click": 2}}
    assert result.describe().startswith("t.csv: 3 events, 2 users, 2 items, 2 actions")
    assert result.table.column_names == [*EVENT_COLUMNS, "surface", "genre"]
