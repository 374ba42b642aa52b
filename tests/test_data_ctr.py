import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from pinfm_hf import PinFMTokenizer
from pinfm_hf.data import (
    CTR_USE_CASES,
    FEATURES_FILE_NAME,
    CTRDataset,
    CTRFeatureEncoder,
    CTRImpressionGroups,
    EventValidationError,
    PinFMDataCollator,
    build_ctr_samples,
    ctr_splits,
    collate_impression_groups,
    item_feature_table,
    load_movielens_users,
    make_event_table,
    quantile_timestamp,
    split_ctr_samples,
    time_split,
)


def _build(events, case_name, **kwargs):
    case = CTR_USE_CASES[case_name]
    return build_ctr_samples(
        events, positive_actions=case.positive_actions, negative_actions=case.negative_actions, **kwargs
    )


@pytest.fixture(scope="module")
def ml1m_like(ml1m_events):
    return _build(ml1m_events, "like")


@pytest.fixture(scope="module")
def ml1m_users(shared_data_dir):
    return load_movielens_users(shared_data_dir / "ml-1m")


@pytest.fixture
def toy_events():
    # u1: "b" and "c" share second 20, so neither is history of the other; "v" (view) is never an impression.
    table = pa.table({
        "user_id": ["u1", "u1", "u1", "u1", "u2", "u2", "u1"],
        "item_id": ["a", "b", "c", "v", "x", "y", "d"],
        "action": ["buy", "skip", "buy", "view", "skip", "buy", "skip"],
        "timestamp": [10, 20, 20, 25, 5, 6, 30],
        "surface": ["home", "home", "search", "home", "search", "home", "search"],
        "category": ["k1", "k2", "k1", "k3", "k2", "k2", "k1"],
    })
    return make_event_table(table, source="toy")


def test_use_cases():
    assert set(CTR_USE_CASES) == {"like", "love", "purchase", "engage"}
    assert CTR_USE_CASES["like"].positive_actions == ("rating_4", "rating_5")
    assert CTR_USE_CASES["love"].negative_actions == ("rating_1", "rating_2", "rating_3", "rating_4")
    purchase = CTR_USE_CASES["purchase"]
    assert (purchase.positive_actions, purchase.negative_actions) == (("buy",), ("pv",))
    assert CTR_USE_CASES["engage"].positive_actions == ("cart", "fav", "buy")
    assert {c.dataset for c in CTR_USE_CASES.values()} == {"ml-1m", "taobao"}


def test_toy_samples_and_same_second_ties(toy_events):
    sequences, samples = build_ctr_samples(toy_events, positive_actions=["buy"], negative_actions=["skip"])
    assert sequences["user_id"] == ["u1", "u2"]
    assert samples.column_names == [
        "user_index", "history_length", "user_id", "item_id", "timestamp", "label", "item_first_seen", "surface",
        "category",
    ]
    assert samples["item_id"].to_pylist() == ["a", "b", "c", "d", "x", "y"]  # "v" is history only
    assert samples["history_length"].to_pylist() == [0, 1, 1, 4, 0, 1]  # c does not see b (same second)
    assert samples["label"].to_pylist() == [1, 0, 1, 0, 0, 1]
    assert samples["user_index"].to_pylist() == [0, 0, 0, 0, 1, 1]
    assert samples["surface"].to_pylist() == ["home", "home", "search", "search", "search", "home"]
    assert samples["category"].to_pylist() == ["k1", "k2", "k1", "k1", "k2", "k2"]
    assert samples["item_first_seen"].to_pylist() == [10, 20, 20, 30, 5, 6]
    assert samples.schema.field("label").type == pa.int8()
    assert samples.schema.field("history_length").type == pa.int64()

    tokenizer = PinFMTokenizer.from_events(toy_events, num_hash_buckets=0)
    dataset = CTRDataset(sequences, samples, tokenizer, max_history=10)
    item = dataset[2]  # "c" at t=20: history is "a" only, never its same-second neighbour "b"
    assert item["input_ids"].tolist() == tokenizer.convert_tokens_to_ids(["a", "c"])
    assert item["action_ids"].tolist() == [tokenizer.action_to_id["buy"], tokenizer.candidate_action_id]
    assert item["timestamps"].tolist() == [10, 20]
    assert item["surface_ids"].tolist() == [tokenizer.surface_to_id["home"], tokenizer.surface_to_id["search"]]
    item = dataset[3]  # "d" sees the view event too
    assert item["input_ids"].tolist() == tokenizer.convert_tokens_to_ids(["a", "b", "c", "v", "d"])
    assert item["label"] == np.float32(0) and item["label"].dtype == np.float32
    assert item["user_index"] == 0 and item["user_index"].dtype == np.int64
    assert item["candidate_age"] == 0  # "d" is seen for the first time at this impression

    # A history that reaches the impression's second is refused (samples not built from these sequences).
    tampered = samples.set_column(1, "history_length", pa.array([0, 1, 2, 4, 0, 1], pa.int64()))
    with pytest.raises(ValueError, match="leakage"):
        CTRDataset(sequences, tampered, tokenizer, max_history=10)


def test_bad_actions(toy_events):
    with pytest.raises(ValueError, match=r"\['click'\].*known actions: \['buy', 'skip', 'view'\]"):
        build_ctr_samples(toy_events, positive_actions=["click"], negative_actions=["skip"])
    with pytest.raises(ValueError, match=r"\['buy'\] are both positive and negative"):
        build_ctr_samples(toy_events, positive_actions=["buy"], negative_actions=["skip", "buy"])
    with pytest.raises(ValueError, match="non-empty"):
        build_ctr_samples(toy_events, positive_actions=["buy"], negative_actions=[])
    with pytest.raises(TypeError):
        build_ctr_samples(toy_events, positive_actions="buy", negative_actions=["skip"])


def test_ml1m_like_counts_and_order(ml1m_events, ml1m_like):
    sequences, samples = ml1m_like
    assert samples.num_rows == 1_000_209 == len(ml1m_events)
    positive = pc.is_in(ml1m_events.table["action"], value_set=pa.array(["rating_4", "rating_5"]))
    expected_rate = pc.sum(pc.cast(positive, pa.int64())).as_py() / len(ml1m_events)
    assert pc.mean(samples["label"]).as_py() == pytest.approx(expected_rate, abs=1e-12)
    # Every event is an impression here, so the samples are the flattened sequences, in order.
    flat_items = sequences.with_format("arrow")[:]["item_ids"].combine_chunks().flatten()
    assert samples["item_id"].combine_chunks().equals(flat_items)
    user_index = samples["user_index"].to_numpy()
    assert (np.diff(user_index) >= 0).all()
    same_user = np.diff(user_index) == 0
    assert (np.diff(samples["timestamp"].to_numpy())[same_user] >= 0).all()
    assert set(samples.column_names) >= {"genre"} and "surface" not in samples.column_names


def test_ml1m_history_is_strictly_before_impression(ml1m_events, ml1m_like):
    sequences, samples = ml1m_like
    # Independent reference: each user's timestamps sorted straight from the event table.
    table = ml1m_events.table
    users = table["user_id"].to_numpy(zero_copy_only=False)
    times = table["timestamp"].to_numpy()
    order = np.lexsort((times, users))
    users, times = users[order], times[order]
    bounds = {u: (s, e) for u, s, e in zip(*_runs(users))}

    user_index = samples["user_index"].to_numpy()
    history_length = samples["history_length"].to_numpy()
    position = np.arange(samples.num_rows) - np.searchsorted(user_index, user_index)  # all events are impressions
    ties = np.flatnonzero(history_length < position)  # an earlier same-second event is excluded
    assert len(ties) > 0
    rows = np.concatenate([np.random.default_rng(0).choice(samples.num_rows, 200, replace=False), ties[:50]])
    for row in rows.tolist():
        user, t = samples["user_id"][row].as_py(), samples["timestamp"][row].as_py()
        start, end = bounds[user]
        assert history_length[row] == np.searchsorted(times[start:end], t, side="left")
        user_times = sequences[int(user_index[row])]["timestamps"]
        assert all(ts < t for ts in user_times[: history_length[row]])
    tie = int(ties[0])
    user_times = sequences[int(user_index[tie])]["timestamps"]
    assert user_times[history_length[tie]] == samples["timestamp"][tie].as_py()


def _runs(sorted_values):
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(sorted_values)]
    return sorted_values[starts], starts, ends


def test_taobao_purchase_keeps_cart_and_fav_in_histories(taobao_events):
    sequences, samples = _build(taobao_events, "purchase")
    counts = taobao_events.summary()["actions"]
    assert samples.num_rows == counts["pv"] + counts["buy"]
    assert pc.sum(samples["label"]).as_py() == counts["buy"]
    assert "category" in samples.column_names
    # The sequences keep every event; some impression histories hold cart/fav events.
    seq = sequences.with_format("arrow")[:]
    lengths = pc.list_value_length(seq["actions"]).to_numpy()
    assert lengths.sum() == len(taobao_events)
    actions = seq["actions"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    offsets = np.r_[0, np.cumsum(lengths)]
    is_other = np.isin(actions, ["cart", "fav"])
    first_other = np.array([
        np.argmax(is_other[s:e]) if is_other[s:e].any() else e - s for s, e in zip(offsets[:-1], offsets[1:])
    ])
    user_index = samples["user_index"].to_numpy()
    assert (samples["history_length"].to_numpy() > first_other[user_index]).sum() > 1000
    # No impression is a cart/fav event: each sample's (user, item, time) is a pv or buy event of the log.
    impressions = pc.is_in(taobao_events.table["action"], value_set=pa.array(["pv", "buy"]))
    log = taobao_events.table.filter(impressions)
    keys = lambda t: sorted(zip(t["user_id"].to_pylist(), t["item_id"].to_pylist(), t["timestamp"].to_pylist()))
    assert keys(samples) == keys(log)


def test_split_ctr_samples(ml1m_events, ml1m_like, caplog):
    _, samples = ml1m_like
    cut = quantile_timestamp(ml1m_events, 0.8)
    assert cut == time_split(ml1m_events, quantile=0.8)[2]
    with caplog.at_level(logging.INFO):
        train, test = split_ctr_samples(samples, cut)
    assert pc.max(train["timestamp"]).as_py() < cut <= pc.min(test["timestamp"]).as_py()
    assert train.num_rows + test.num_rows == samples.num_rows
    assert pc.sum(train["label"]).as_py() + pc.sum(test["label"]).as_py() == pc.sum(samples["label"]).as_py()
    assert 0.75 < train.num_rows / samples.num_rows <= 0.8
    assert "positive rate" in caplog.text and f"{train.num_rows:,}" in caplog.text
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        quantile_timestamp(ml1m_events, 1.0)


def test_user_features_join_and_missing_user(ml1m_events, ml1m_like, ml1m_users):
    _, samples = _build(ml1m_events, "love", user_features=ml1m_users)
    assert samples.column_names[-3:] == ["age", "gender", "occupation"]
    assert samples.num_rows == ml1m_like[1].num_rows
    by_user = {row["user_id"]: row for row in ml1m_users.to_pylist()}
    for row in np.random.default_rng(1).choice(samples.num_rows, 100, replace=False).tolist():
        sample = samples.slice(row, 1).to_pylist()[0]
        assert {k: sample[k] for k in ("age", "gender", "occupation")} == {
            k: by_user[sample["user_id"]][k] for k in ("age", "gender", "occupation")
        }
    # Integer columns are cast to strings.
    numeric = ml1m_users.set_column(1, "age", pc.cast(ml1m_users["age"], pa.int64()))
    _, samples = _build(ml1m_events, "love", user_features=numeric)
    assert samples.schema.field("age").type == pa.string()

    missing = ml1m_users.filter(pc.not_equal(ml1m_users["user_id"], "1m_42"))
    with pytest.raises(EventValidationError, match=r"'1m_42' \(1 user\(s\)"):
        _build(ml1m_events, "like", user_features=missing)


def _feature_samples(genres, categories):
    return pa.table({"genre": genres, "category": categories})


def test_feature_encoder_fit_and_encode_layout():
    train = _feature_samples(["Action Comedy", "Comedy", "Drama Comedy Action", ""], ["c1", "c2", "c1", "c1"])
    encoder = CTRFeatureEncoder.fit(train, ["genre", "category"])
    assert encoder.fields == ["genre", "category"]
    assert encoder.slots == [3, 1] and encoder.num_slots == 4
    # By descending count, ties by value; ids start at 2 (0 pads, 1 is unknown).
    assert encoder.vocab == ["genre=Comedy", "genre=Action", "genre=Drama", "category=c1", "category=c2"]
    assert encoder.vocab_size == 7
    test = _feature_samples(["Action Comedy", "Western", "", "Drama Comedy Action"], ["c2", "c1", "zz", "c1"])
    encoded = encoder.encode(test)
    assert encoded.dtype == np.int64
    np.testing.assert_array_equal(encoded, [[3, 2, 0, 6], [1, 0, 0, 5], [0, 0, 0, 1], [4, 2, 3, 5]])

    with pytest.raises(ValueError, match="'category' is missing"):
        encoder.encode(train.select(["genre"]))
    with pytest.raises(ValueError, match=r"'genre' has a missing \(null\) value at row 1"):
        encoder.encode(_feature_samples(["Comedy", None], ["c1", "c1"]))
    rare = CTRFeatureEncoder.fit(train, ["category"], min_count=2)
    assert rare.vocab == ["category=c1"]
    np.testing.assert_array_equal(rare.encode(train), [[2], [1], [2], [2]])


def test_feature_encoder_slot_cap_warns(caplog):
    train = _feature_samples(["a b c d", "a", "a b c"], ["c1", "c1", "c1"])
    with caplog.at_level(logging.WARNING):
        encoder = CTRFeatureEncoder.fit(train, ["genre"], max_slots_per_field=2)
    assert encoder.slots == [2]
    assert "2 of 3 rows have more than 2 values" in caplog.text
    truncated = _feature_samples(["a b", "a", "a b"], ["c1"] * 3)
    np.testing.assert_array_equal(encoder.encode(train), encoder.encode(truncated))  # the first values are kept


def test_feature_encoder_ml1m_genres(ml1m_events, ml1m_like, ml1m_users):
    _, samples = ml1m_like
    encoder = CTRFeatureEncoder.fit(samples, ["genre"])
    genres = pc.utf8_split_whitespace(ml1m_events.table["genre"].combine_chunks())
    assert encoder.slots == [pc.max(pc.list_value_length(genres)).as_py()] == [6]
    assert encoder.vocab_size == 2 + len(pc.unique(genres.flatten()))
    row = samples.slice(0, 1)
    ids = encoder.encode(row)[0]
    values = row["genre"][0].as_py().split()
    assert ids[: len(values)].tolist() == [encoder.vocab.index(f"genre={v}") + 2 for v in values]
    assert (ids[len(values) :] == 0).all()


def test_item_feature_table_encodes_each_known_items_fields_as_its_impressions_do(toy_events):
    _, samples = build_ctr_samples(toy_events, positive_actions=["buy"], negative_actions=["skip"])
    encoder = CTRFeatureEncoder.fit(samples, ["surface", "category"])
    # A tokenizer that never saw item "d": its bucket is shared with other unseen items, so it gets no row.
    seen = toy_events.table.filter(pc.not_equal(toy_events.table["item_id"], "d"))
    tokenizer = PinFMTokenizer.from_events(make_event_table(seen, source="toy"))
    token_ids, feature_ids = item_feature_table(toy_events, tokenizer, encoder, ["category"])
    items = ["a", "b", "c", "v", "x", "y"]
    assert sorted(token_ids.tolist()) == sorted(tokenizer.item_ids_to_token_ids(items).tolist())
    assert feature_ids.shape == (6, 1)  # the category slot alone, not the surface's
    by_token = dict(zip(token_ids.tolist(), feature_ids[:, 0].tolist()))
    category = dict(zip(toy_events.table["item_id"].to_pylist(), toy_events.table["category"].to_pylist()))
    for item in items:  # "v" (k3) is no impression: unknown to the encoder (1), still in the table
        expected = encoder.vocab.index(f"category={category[item]}") + 2 if f"category={category[item]}" in encoder.vocab else 1
        assert by_token[int(tokenizer.item_ids_to_token_ids([item])[0])] == expected, item
    assert by_token[int(tokenizer.item_ids_to_token_ids(["v"])[0])] == 1
    with pytest.raises(ValueError, match=r"Fields \['genre'\] are not encoded"):
        encoder.encode(samples, fields=["genre"])
    with pytest.raises(ValueError, match="no item feature column"):
        item_feature_table(toy_events.table.drop_columns(["category"]), tokenizer, encoder, ["category"])


def test_feature_encoder_save_load(tmp_path, monkeypatch):
    train = _feature_samples(["Action Comedy", "Comedy"], ["c1", "c2"])
    encoder = CTRFeatureEncoder.fit(train, ["genre", "category"])
    path = encoder.save(tmp_path / "features")
    assert path == tmp_path / "features" / FEATURES_FILE_NAME
    loaded = CTRFeatureEncoder.load(tmp_path / "features")
    assert (loaded.fields, loaded.vocab, loaded.slots) == (encoder.fields, encoder.vocab, encoder.slots)
    np.testing.assert_array_equal(loaded.encode(train), encoder.encode(train))

    # A failed save leaves the previous file whole and no temporary file behind.
    before = path.read_bytes()
    bigger = CTRFeatureEncoder.fit(_feature_samples(["Drama"], ["c9"]), ["genre", "category"])

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        bigger.save(tmp_path / "features")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [FEATURES_FILE_NAME]

    path.write_text('{"fields": ["genre"], "vocab": [')
    with pytest.raises(ValueError, match=f"Corrupt CTR feature vocabulary .*{FEATURES_FILE_NAME}"):
        CTRFeatureEncoder.load(path.parent)
    path.write_text(json.dumps({"fields": ["genre"]}))
    with pytest.raises(ValueError, match=FEATURES_FILE_NAME):
        CTRFeatureEncoder.load(path.parent)
    with pytest.raises(FileNotFoundError, match=FEATURES_FILE_NAME):
        CTRFeatureEncoder.load(tmp_path / "nowhere")


def test_ctr_dataset_layout_and_collator(ml1m_events, ml1m_like, ml1m_users):
    sequences, samples = _build(ml1m_events, "like", user_features=ml1m_users)
    tokenizer = PinFMTokenizer.from_events(ml1m_events)
    encoder = CTRFeatureEncoder.fit(samples, ["genre", "age", "gender", "occupation"])
    max_history = 5
    dataset = CTRDataset(sequences, samples, tokenizer, max_history=max_history, feature_encoder=encoder)
    assert len(dataset) == samples.num_rows

    history_length = samples["history_length"].to_numpy()
    rows = [int(np.argmax(mask)) for mask in (history_length == 0, history_length == 3, history_length > 50)]
    items = [dataset[row] for row in rows]
    for row, item in zip(rows, items):
        sample = samples.slice(row, 1).to_pylist()[0]
        sequence = sequences[sample["user_index"]]
        h = sample["history_length"]
        kept = slice(max(h - max_history, 0), h)  # the most recent history events only
        expected = tokenizer.encode_events(
            sequence["item_ids"][kept], actions=sequence["actions"][kept], timestamps=sequence["timestamps"][kept]
        )
        assert len(item["input_ids"]) == min(h, max_history) + 1
        candidate = tokenizer.convert_tokens_to_ids([sample["item_id"]])
        assert item["input_ids"].tolist() == expected["input_ids"] + candidate
        assert item["action_ids"].tolist() == expected["action_ids"] + [tokenizer.candidate_action_id]
        assert item["timestamps"].tolist() == expected["timestamps"] + [sample["timestamp"]]
        assert item["label"] == sample["label"]
        assert item["user_index"] == sample["user_index"]
        np.testing.assert_array_equal(item["side_feature_ids"], encoder.encode(samples.slice(row, 1))[0])
        assert "surface_ids" not in item

    collator = PinFMDataCollator(pad_token_id=tokenizer.pad_token_id, padding_side="left", max_length=max_history + 1)
    batch = collator(items)
    assert batch["input_ids"].shape == (3, max_history + 1)
    assert batch["attention_mask"].tolist() == [[0] * 5 + [1], [0, 0] + [1] * 4, [1] * 6]
    assert batch["input_ids"][:, -1].tolist() == [item["input_ids"][-1] for item in items]
    assert (batch["action_ids"][:, -1] == tokenizer.candidate_action_id).all()
    assert batch["input_ids"][0, :-1].tolist() == [tokenizer.pad_token_id] * 5
    assert batch["label"].dtype == torch.float32 and batch["label"].shape == (3,)
    assert batch["user_index"].tolist() == [item["user_index"] for item in items]
    assert batch["side_feature_ids"].shape == (3, encoder.num_slots)


def test_ctr_dataset_unknown_action_is_the_tokenizer_error(toy_events):
    sequences, samples = build_ctr_samples(toy_events, positive_actions=["buy"], negative_actions=["skip"])
    known = toy_events.table.filter(pc.not_equal(toy_events.table["action"], "view"))
    tokenizer = PinFMTokenizer.from_events(known)
    with pytest.raises(ValueError, match=r"Unknown actions \['view'\]"):
        CTRDataset(sequences, samples, tokenizer, max_history=3)


def test_impression_groups_keep_each_request_together(toy_events):
    sequences, samples = build_ctr_samples(toy_events, positive_actions=["buy"], negative_actions=["skip"])
    tokenizer = PinFMTokenizer.from_events(toy_events)
    groups = CTRImpressionGroups(CTRDataset(sequences, samples, tokenizer, max_history=4))
    # u1's "b" and "c" share second 20 (same history): one request; every other impression is its own.
    assert len(groups) == samples.num_rows - 1
    sizes = [len(groups[i]) for i in range(len(groups))]
    assert sorted(sizes) == [1] * (len(groups) - 1) + [2]
    pair = groups[sizes.index(2)]
    assert [e["timestamps"][-1] for e in pair] == [20, 20]
    np.testing.assert_array_equal(pair[0]["input_ids"][:-1], pair[1]["input_ids"][:-1])
    assert groups.mean_group_size == samples.num_rows / len(groups)
    collate = collate_impression_groups(PinFMDataCollator(padding_side="left"))
    batch = collate([groups[i] for i in range(len(groups))])
    assert batch["input_ids"].shape[0] == samples.num_rows


def test_item_first_seen_is_the_first_event_of_the_item_anywhere(ml1m_events, ml1m_like):
    _, samples = ml1m_like
    first = ml1m_events.table.group_by("item_id").aggregate([("timestamp", "min")])
    expected = dict(zip(first["item_id"].to_pylist(), first["timestamp_min"].to_pylist()))
    rows = samples.slice(0, 2000).to_pylist()
    assert all(row["item_first_seen"] == expected[row["item_id"]] for row in rows)
    ages = pc.subtract(samples["timestamp"], samples["item_first_seen"])
    assert pc.min(ages).as_py() == 0  # never negative, and some impression is the item's first event


def test_ctr_splits_validation_slice_lies_between_the_two_cuts(ml1m_events):
    case = CTR_USE_CASES["like"]
    kwargs = dict(positive_actions=case.positive_actions, negative_actions=case.negative_actions, cut_quantile=0.9)
    plain = ctr_splits(ml1m_events, **kwargs)
    split = ctr_splits(ml1m_events, **kwargs, validation_cut_quantile=0.85, max_validation_samples=5000)
    validation_cut = quantile_timestamp(ml1m_events, 0.85)
    assert split.validation_cut == validation_cut and split.cut == plain.cut
    assert pc.max(split.train["timestamp"]).as_py() < validation_cut <= pc.min(split.valid["timestamp"]).as_py()
    assert pc.max(split.valid["timestamp"]).as_py() < split.cut
    assert split.test.equals(plain.test)  # the test period is untouched
    # Whole requests, about the asked size; the rest of the slice is dropped, not moved to training.
    assert 5000 <= split.valid.num_rows < 5100
    assert split.train.num_rows < plain.train.num_rows - 5000
    with pytest.raises(ValueError, match="before the test period"):
        ctr_splits(ml1m_events, **kwargs, validation_cut_quantile=0.95)
