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


# ----- timestamp units -----


@pytest.mark.parametrize(
    "values, unit",
    [
        (["978300760000", "978300761999", "978300762000"], "milliseconds"),
        (["978300760000000", "978300761999999", "978300762000000"], "microseconds"),
        (["978300760000000000", "978300761999999999", "978300762000000000"], "nanoseconds"),
        ([978300760000.0, 978300761999.0, 9.78300762e11], "milliseconds"),
    ],
)
def test_timestamp_unit_auto_converts_with_a_notice(values, unit, caplog):
    with caplog.at_level(logging.WARNING):
        table = validate_events(events(timestamp=values), source="t.csv", line_offset=2)
    assert table["timestamp"].to_pylist() == [978300760, 978300761, 978300762]  # floored, exact for ns
    assert "t.csv, column 'timestamp': values such as" in caplog.text
    assert f"are unix {unit}; converted to seconds" in caplog.text and "--timestamp_unit" in caplog.text


def test_timestamp_unit_auto_seconds_are_silent(caplog):
    with caplog.at_level(logging.WARNING):
        table = validate_events(events(timestamp=["5", "978300760", "978300761"]), source="t")
    assert table["timestamp"].to_pylist() == [5, 978300760, 978300761] and caplog.text == ""


def test_timestamp_unit_auto_refuses_mixed_units():
    with pytest.raises(
        EventValidationError,
        match=r"^t\.csv, line 2, column 'timestamp': value '978300760' looks like unix seconds but value "
        r"'978300761000' \(line 3\) looks like unix milliseconds: units are mixed; set --timestamp_unit",
    ):
        validate_events(events(timestamp=["978300760", "978300761000", "978300762"]), source="t.csv", line_offset=2)


def test_timestamp_unit_explicit():
    millis = events(timestamp=[978300760000, 978300761000, 978300762000])
    assert validate_events(millis, source="t", timestamp_unit="ms")["timestamp"].to_pylist() == [
        978300760, 978300761, 978300762]
    with pytest.raises(
        EventValidationError,
        match=r"^t, row 0, column 'timestamp': value 978300760000 is too large for unix seconds .* with "
        r"--timestamp_unit s; it looks like unix milliseconds: set --timestamp_unit ms or auto$",
    ):
        validate_events(millis, source="t", timestamp_unit="s")
    nanos = events(timestamp=["978300760000000000"] * 3)
    with pytest.raises(EventValidationError, match=r"too large for unix microseconds .* looks like unix nanoseconds"):
        validate_events(nanos, source="t", timestamp_unit="us")
    with pytest.raises(ValueError, match=r"`timestamp_unit` \('sec'\) must be one of 'auto', 's', 'ms', 'us', 'ns'"):
        validate_events(millis, source="t", timestamp_unit="sec")


def test_timestamp_unit_explicit_too_coarse_warns(caplog):
    with caplog.at_level(logging.WARNING):
        validate_events(events(timestamp=[978300760, 978300761, 978300762]), source="t", timestamp_unit="ms")
    assert "with --timestamp_unit ms every event is before 1973" in caplog.text


def test_typed_timestamps_use_their_own_unit():
    millis = pa.array([978300760000, 978300761500, 978300762000], pa.timestamp("ms", tz="Europe/Paris"))
    assert validate_events(events(timestamp=millis), source="t")["timestamp"].to_pylist() == [
        978300760, 978300761, 978300762]
    days = pa.array([0, 1, 12111], pa.date32())
    assert validate_events(events(timestamp=days), source="t")["timestamp"].to_pylist() == [0, 86400, 1046390400]
    before_1970 = pa.array([-1000, 0, 0], pa.timestamp("ms"))
    with pytest.raises(EventValidationError, match=r"row 0, column 'timestamp': value .* is before 1970"):
        validate_events(events(timestamp=before_1970), source="t")


def test_iso_dates(caplog):
    with caplog.at_level(logging.WARNING):
        table = validate_events(events(timestamp=["2003-02-28 17:49:50", "2003-02-28T17:49:50.9", "2003-03-01"]),
                                source="t")
    assert table["timestamp"].to_pylist() == [1046454590, 1046454590, 1046476800]
    assert "dates without a time zone (e.g. '2003-02-28 17:49:50') are read as UTC" in caplog.text
    zoned = validate_events(events(timestamp=["2003-02-28T17:49:50+01:00", "2003-02-28T17:49:50Z", "1970-01-01T00:00Z"]),
                            source="t")
    assert zoned["timestamp"].to_pylist() == [1046450990, 1046454590, 0]


@pytest.mark.parametrize(
    "values, expected",
    [
        (["2003-02-28", "1046454600", "2003-03-01"],
         r"line 3, column 'timestamp': value '1046454600' is not an ISO 8601 date like '2003-02-28' \(line 2\)"),
        (["2003-02-28 10:00Z", "2003-02-28 10:00", "2003-03-01 10:00Z"],
         r"line 3, column 'timestamp': value '2003-02-28 10:00' has no time zone but '2003-02-28 10:00Z' \(line 2\) has one"),
        (["2003-02-28", "2003-02-30", "2003-03-01"], r"line 3, column 'timestamp': value '2003-02-30' is not a valid date"),
        (["2003-02-28", "1969-12-31", "2003-03-01"], r"line 3, column 'timestamp': value '1969-12-31' is before 1970"),
    ],
)
def test_bad_iso_dates(values, expected):
    with pytest.raises(EventValidationError, match=expected):
        validate_events(events(timestamp=values), source="t.csv", line_offset=2)


# ----- ids -----


def test_integer_ids_written_as_floats_are_one_id(caplog):
    with caplog.at_level(logging.WARNING):
        table = validate_events(events(user_id=["1", "1.0", "2"], item_id=["10.0", "10", "11.00"]), source="t")
    assert table["user_id"].to_pylist() == ["1", "1", "2"] and table["item_id"].to_pylist() == ["10", "10", "11"]
    assert "column 'user_id': integer ids written as floats (e.g. '1.0'); read as '1'" in caplog.text
    # Not every id is an integer: the strings are kept as they are.
    kept = validate_events(events(user_id=["1", "1.0", "v1.0"]), source="t")
    assert kept["user_id"].to_pylist() == ["1", "1.0", "v1.0"]


def test_float_typed_ids():
    table = validate_events(events(user_id=pa.array([1.0, 1.0, 2.0])), source="t")
    assert table["user_id"].to_pylist() == ["1", "1", "2"]
    with pytest.raises(EventValidationError, match=r"row 1, column 'user_id': value 1\.5 is not an integer id"):
        validate_events(events(user_id=pa.array([1.0, 1.5, 2.0])), source="t")
    with pytest.raises(EventValidationError, match=r"row 2, column 'item_id': value nan is missing \(NaN\)"):
        validate_events(events(item_id=pa.array([1.0, 2.0, float("nan")])), source="t")


def test_nul_byte_in_an_id():
    with pytest.raises(EventValidationError, match=r"line 3, column 'item_id': value 'b\\x00' holds a NUL byte"):
        validate_events(events(item_id=["a", "b\x00", "a"]), source="t.csv", line_offset=2)


def test_nested_id_column():
    with pytest.raises(EventValidationError, match=r"column 'item_id': expected strings or integers, got list<.*flatten"):
        validate_events(events(item_id=[["a"], ["b"], ["a"]]), source="t")


def test_repeat_share_counts_events_that_repeat_a_users_item():
    table = events(user_id=["u1", "u1", "u1", "u2"], item_id=["a", "a", "b", "a"], action=["click"] * 4,
                   timestamp=["10", "20", "30", "40"])
    assert make_event_table(table, source="t").repeat_share() == pytest.approx(0.25)  # u1's second "a"; u2's "a" is new
    assert make_event_table(events(), source="t").repeat_share() == 0.0
