import logging
import time

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pinfm_hf.data import (
    EventTable,
    build_user_sequences,
    leave_last_out_split,
    load_sequences,
    make_event_table,
    save_sequences,
    time_split,
)


@pytest.fixture
def events() -> EventTable:
    # u2 has a timestamp tie (b before c in file order must be kept); u3 has one event, u4 two.
    table = pa.table({
        "user_id": ["u2", "u1", "u2", "u2", "u1", "u3", "u2", "u4", "u4", "u1"],
        "item_id": ["a", "x", "b", "c", "y", "z", "d", "p", "q", "w"],
        "action": ["view", "view", "buy", "view", "buy", "view", "view", "view", "buy", "view"],
        "timestamp": [40, 1, 20, 20, 3, 7, 10, 5, 6, 2],
        "surface": ["home"] * 10,
        "genre": ["g1", "g2", "g3", "g4", "g5", "g6", "g7", "g8", "g9", "g0"],
    })
    return make_event_table(table, source="toy")


def test_sequences_are_time_ordered_with_stable_ties(events):
    seqs = build_user_sequences(events)
    assert isinstance(seqs, datasets.Dataset)
    assert seqs.column_names == ["user_id", "item_ids", "actions", "timestamps", "surfaces", "genre"]
    assert seqs["user_id"] == ["u1", "u2", "u3", "u4"]
    u2 = seqs[1]
    assert u2["item_ids"] == ["d", "b", "c", "a"]
    assert u2["timestamps"] == [10, 20, 20, 40]
    assert u2["actions"] == ["view", "buy", "view", "view"]
    assert u2["genre"] == ["g7", "g3", "g4", "g1"]
    assert seqs[0]["item_ids"] == ["x", "w", "y"]
    assert build_user_sequences(events.table)["item_ids"] == seqs["item_ids"]  # plain tables work too


def test_leave_last_out_split(events, caplog):
    seqs = build_user_sequences(events)
    with caplog.at_level(logging.WARNING):
        splits = leave_last_out_split(seqs)
    assert set(splits) == {"train", "valid", "test"}
    # test: full sequences with >= 2 events; valid: minus last, >= 3 events; train: minus last, >= 2 events.
    assert splits["test"]["user_id"] == ["u1", "u2", "u4"]
    assert splits["test"][1]["item_ids"] == ["d", "b", "c", "a"]
    assert splits["valid"]["user_id"] == ["u1", "u2"]
    assert splits["valid"][1]["item_ids"] == ["d", "b", "c"]
    assert splits["valid"][1]["genre"] == ["g7", "g3", "g4"]
    assert splits["train"]["user_id"] == ["u1", "u2", "u4"]
    assert splits["train"]["item_ids"] == [["x", "w"], ["d", "b", "c"], ["p"]]
    assert splits["train"]["timestamps"] == [[1, 2], [10, 20, 20], [5]]
    assert splits.num_users_left_out == {"train": 1, "valid": 2, "test": 1}
    assert "`valid` split: left out 2 of 4 users with fewer than 3 events" in caplog.text

    strict = leave_last_out_split(seqs, train_holdout=2)
    assert strict["train"]["item_ids"] == [["x"], ["d", "b"]]
    assert strict.num_users_left_out["train"] == 2
    with pytest.raises(ValueError, match="train_holdout"):
        leave_last_out_split(seqs, train_holdout=0)


def test_split_honours_selected_rows(events):
    seqs = build_user_sequences(events).select([1, 0])
    assert leave_last_out_split(seqs)["train"]["user_id"] == ["u2", "u1"]


def test_time_split_partitions_exactly(events):
    before, after, cut = time_split(events, cut_timestamp=10)
    assert cut == 10 and isinstance(before, EventTable)
    assert pc.max(before.table["timestamp"]).as_py() < 10 <= pc.min(after.table["timestamp"]).as_py()
    assert len(before) + len(after) == len(events)
    before, after, cut = time_split(events.table, quantile=0.5)
    assert isinstance(before, pa.Table) and before.num_rows + after.num_rows == 10
    assert pc.all(pc.less(before["timestamp"], cut)).as_py()
    assert pc.all(pc.greater_equal(after["timestamp"], cut)).as_py()
    for kwargs in ({}, {"cut_timestamp": 1, "quantile": 0.5}, {"quantile": 1.0}):
        with pytest.raises(ValueError):
            time_split(events, **kwargs)


def test_save_load_round_trip(events, tmp_path):
    seqs = build_user_sequences(events)
    splits = leave_last_out_split(seqs)
    save_sequences(seqs, tmp_path / "seqs")
    save_sequences(splits, tmp_path / "splits")
    assert load_sequences(tmp_path / "seqs").to_list() == seqs.to_list()
    loaded = load_sequences(tmp_path / "splits")
    assert {k: v.to_list() for k, v in loaded.items()} == {k: v.to_list() for k, v in splits.items()}
    save_sequences(splits["train"], tmp_path / "seqs")  # overwrites an existing folder
    assert load_sequences(tmp_path / "seqs").to_list() == splits["train"].to_list()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seqs", "splits"]  # no temporary folders left
    with pytest.raises(FileNotFoundError):
        load_sequences(tmp_path / "missing")


def test_ml1m_sequences_and_splits(ml1m_events):
    start = time.perf_counter()
    seqs = build_user_sequences(ml1m_events)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0  # ~0.35 s on 2 cores
    assert len(seqs) == 6_040
    table = seqs.data.table
    lengths = pc.list_value_length(table["item_ids"])
    assert pc.sum(lengths).as_py() == 1_000_209
    for column in ("actions", "timestamps", "genre"):
        assert pc.list_value_length(table[column]).equals(lengths)
    # Time-ordered within every user: no decrease between neighbours of the same list.
    ts = pc.list_flatten(table["timestamps"]).to_numpy()
    parents = pc.list_parent_indices(table["timestamps"]).to_numpy()
    same_user = parents[1:] == parents[:-1]
    assert (ts[1:][same_user] >= ts[:-1][same_user]).all()

    splits = leave_last_out_split(seqs)
    assert splits.num_users_left_out == {"train": 0, "valid": 0, "test": 0}
    train_lengths = pc.list_value_length(splits["train"].data.table["item_ids"])
    assert pc.subtract(lengths, train_lengths).unique().to_pylist() == [1]
    test = splits["test"].data.table
    assert pc.list_element(test["item_ids"], 0).equals(pc.list_element(table["item_ids"], 0))
    last = pc.subtract(lengths, 1)
    first_user = seqs[0]
    assert splits["test"][0]["item_ids"][-1] == first_user["item_ids"][-1]
    assert splits["valid"][0]["item_ids"] == first_user["item_ids"][:-1]
    assert pc.sum(last).as_py() == pc.sum(train_lengths).as_py()


def test_ml1m_time_split(ml1m_events):
    before, after, cut = time_split(ml1m_events, quantile=0.9)
    assert len(before) + len(after) == len(ml1m_events)
    assert 0.85 < len(before) / len(ml1m_events) <= 0.9


def test_split_refuses_a_log_where_no_user_has_two_events():
    single = make_event_table(pa.table({"user_id": ["u1", "u2", "u3"], "item_id": ["a", "b", "a"],
                                        "action": ["view"] * 3, "timestamp": [1, 2, 3]}), source="toy")
    with pytest.raises(ValueError, match=r"^No user has 2 or more events, so leave-last-out leaves nothing to train on: "
                       r"3 users, 3 events, at most 1 per user \(train_holdout=1\)"):
        leave_last_out_split(build_user_sequences(single))


def test_split_refuses_train_holdout_longer_than_every_history(events):
    with pytest.raises(ValueError, match=r"No user has 5 or more events.* at most 4 per user \(train_holdout=4\)"):
        leave_last_out_split(build_user_sequences(events), train_holdout=4)


def test_time_split_quantile_on_tied_times():
    tied = pa.table({"user_id": ["u1", "u1", "u2", "u2"], "item_id": ["a", "b", "a", "c"], "action": ["v"] * 4,
                     "timestamp": pa.array([5, 5, 5, 6], pa.int64())})
    with pytest.raises(ValueError, match=r"quantile 0\.5: no event is before the cut 5; 4 events are at or after it, "
                       r"3 of them exactly at it"):
        time_split(tied, quantile=0.5)
    before, after, cut = time_split(tied, cut_timestamp=5)  # an explicit cut is the caller's choice
    assert (before.num_rows, after.num_rows, cut) == (0, 4, 5)
