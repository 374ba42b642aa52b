"""benchmarks/bench_ctr_peers.py: the LightGBM history aggregates on a hand-made log equal hand-computed values and
never read an event at or after the impression; train-split statistics never use a train row's own label."""

import math

import numpy as np
import pyarrow as pa
import pytest

from pinfm_hf.data import build_ctr_samples, make_event_table


import bench_ctr_peers as peers  # (tests/conftest.py puts benchmarks/ on the path; lightgbm is imported only to train)


POSITIVE, NEGATIVE = ("buy",), ("pv",)


def _events(rows):
    user, item, action, ts, category = zip(*rows)
    table = pa.table({"user_id": list(user), "item_id": list(item), "action": list(action), "timestamp": list(ts),
                      "category": list(category)})
    return make_event_table(table, source="toy")


# u1: a buy at t=10 in k1, ... The impression under test is u1's `c` (pv) at t=50; `x` shares its second (t=50), `d`
# and `c` again come after it: none of these three may enter its features.
BASE_ROWS = [
    ("u1", "a", "buy", 10, "k1"),
    ("u1", "b", "pv", 20, "k2"),
    ("u1", "c", "fav", 30, "k1"),
    ("u1", "a", "pv", 40, "k1"),
    ("u1", "c", "pv", 50, "k1"),   # the impression
    ("u1", "x", "buy", 50, "k1"),  # same second: not history
    ("u1", "d", "buy", 60, "k1"),  # later
    ("u1", "c", "buy", 70, "k1"),  # later, same item
    ("u2", "z", "cart", 1, "k3"),  # another user (and the log's only cart: every action has columns)
    ("u2", "c", "buy", 5, "k1"),
]


def _features(rows, max_history=50):
    sequences, samples = build_ctr_samples(_events(rows), positive_actions=POSITIVE, negative_actions=NEGATIVE)
    flat = peers.FlatSequences.from_sequences(sequences)
    features = peers.history_features(samples, flat, max_history=max_history, positive_actions=POSITIVE,
                                      negative_actions=NEGATIVE)
    target = [i for i, (u, it, t) in enumerate(zip(samples["user_id"].to_pylist(), samples["item_id"].to_pylist(),
                                                   samples["timestamp"].to_pylist())) if (u, it, t) == ("u1", "c", 50)]
    assert len(target) == 1
    return {name: float(values[target[0]]) for name, values in features.items()}, features, samples


def test_history_features_hand_computed():
    f, _, _ = _features(BASE_ROWS)
    # Window: a/buy@10 k1, b/pv@20 k2, c/fav@30 k1, a/pv@40 k1.
    assert f["hist_len"] == 4
    assert f["hist_share_buy"] == 0.25 and f["hist_share_pv"] == 0.5 and f["hist_share_fav"] == 0.25
    assert f["hist_share_cart"] == 0.0
    assert f["hist_pos_rate"] == pytest.approx(1 / 3)  # impressions (buy or pv) in the window: buy, pv, pv
    assert f["hist_secs_since_last"] == 10
    assert f["item_hist_count"] == 1 and f["item_hist_count_fav"] == 1 and f["item_hist_count_buy"] == 0
    assert f["item_hist_secs_since_last"] == 20
    assert f["category_hist_count"] == 3
    assert f["category_hist_count_buy"] == 1 and f["category_hist_count_pv"] == 1 and f["category_hist_count_fav"] == 1
    assert f["category_hist_pos_rate"] == pytest.approx(1 / 2)  # k1 impressions: a/buy, a/pv
    assert f["category_hist_share_max"] == pytest.approx(3 / 4)


def test_max_history_keeps_the_most_recent_events():
    f, _, _ = _features(BASE_ROWS, max_history=2)  # c/fav@30, a/pv@40
    assert f["hist_len"] == 2 and f["hist_share_buy"] == 0.0 and f["hist_pos_rate"] == 0.0
    assert f["item_hist_count"] == 1 and f["category_hist_count"] == 2


def test_events_at_or_after_the_impression_do_not_change_its_features():
    before, _, _ = _features(BASE_ROWS)
    changed = [list(r) for r in BASE_ROWS]
    for row in changed:
        if row[0] == "u1" and row[3] >= 50 and (row[1], row[3]) != ("c", 50):
            row[2], row[4] = "pv", "k9"  # relabel and recategorise the same-second and later events
    changed.append(("u1", "c", "cart", 50, "k1"))  # another event of the candidate in the same second
    changed.append(("u1", "c", "fav", 55, "k1"))
    after, _, _ = _features([tuple(r) for r in changed])
    assert after == before


def test_first_event_has_an_empty_window():
    _, features, samples = _features(BASE_ROWS)
    first = samples["user_id"].to_pylist().index("u1")
    assert features["hist_len"][first] == 0 and features["item_hist_count"][first] == 0
    assert math.isnan(features["hist_pos_rate"][first]) and math.isnan(features["hist_secs_since_last"][first])


def test_train_statistics_are_out_of_fold_on_train():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 3, 400)
    labels = (codes == 0).astype(np.float64)  # item 0 always positive
    stats = peers.encode_target_statistics("item", {"train": codes, "test": np.array([0, 1, 5])}, labels, seed=0)
    prior, m = labels.mean(), peers.TARGET_ENCODING_SMOOTHING
    n0 = (codes == 0).sum()
    assert stats["test"]["item_train_count"].tolist() == [n0, (codes == 1).sum(), 0]
    assert stats["test"]["item_train_pos_rate"][0] == pytest.approx((n0 + m * prior) / (n0 + m))
    assert stats["test"]["item_train_pos_rate"][2] == pytest.approx(prior)  # unseen: the prior
    # A train row's statistics leave out its own fold: flipping one train label changes other folds' rows only.
    flipped = labels.copy()
    flipped[0] = 1 - flipped[0]
    again = peers.encode_target_statistics("item", {"train": codes, "test": np.array([0])}, flipped, seed=0)
    assert again["train"]["item_train_pos_rate"][0] == stats["train"]["item_train_pos_rate"][0]
