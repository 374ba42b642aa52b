"""The `ctr_metrics` evaluate module (AUC, GAUC, log loss) against scikit-learn and hand-computed cases."""

import ast
import math

import numpy as np
import pytest

from pinfm_hf.evaluate_metrics import CTR_METRICS_PATH, load_ctr_metric


sklearn_metrics = pytest.importorskip("sklearn.metrics")

EPS = 1e-7


def _random_ctr_data(seed=0, n=4000, n_users=400):
    """Scores rounded to 1 decimal (many ties, exact 0.0 and 1.0), int64 user ids, and users of one class only."""
    rng = np.random.default_rng(seed)
    p = np.round(rng.random(n), 1)
    y = (rng.random(n) < 0.2 + 0.6 * p).astype(np.int64)
    u = rng.integers(0, n_users, n).astype(np.int64) * 1_000_003 - 7  # large and negative ids
    # Users with one class only: all positive, all negative, and single impressions.
    extra_u, extra_y = [], []
    for k in range(6):
        extra_u += [2**40 + k] * 3
        extra_y += [1, 1, 1] if k % 2 else [0, 0, 0]
    for k in range(5):
        extra_u.append(2**41 + k)
        extra_y.append(k % 2)
    m = len(extra_u)
    p = np.concatenate([p, np.round(rng.random(m), 1)]).astype(np.float32)
    y = np.concatenate([y, np.array(extra_y, dtype=np.int64)])
    u = np.concatenate([u, np.array(extra_u, dtype=np.int64)])
    perm = rng.permutation(len(p))
    return p[perm], y[perm], u[perm]


def _sklearn_gauc(p, y, u):
    """Reference GAUC: a loop over users with `roc_auc_score`, weighted by each user's impression count."""
    total, weight, used, skipped = 0.0, 0, 0, 0
    for user in np.unique(u):
        mask = u == user
        if len(np.unique(y[mask])) < 2:
            skipped += 1
            continue
        total += mask.sum() * sklearn_metrics.roc_auc_score(y[mask], p[mask])
        weight += mask.sum()
        used += 1
    return total / weight, used, skipped


def test_module_folder_and_self_contained_script():
    script = CTR_METRICS_PATH / "ctr_metrics.py"
    assert CTR_METRICS_PATH.is_dir() and script.is_file()
    imported = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "evaluate copies the script alone: no relative imports"
            imported.add(node.module.split(".")[0])
    assert imported <= {"evaluate", "datasets", "numpy"}, imported


def test_matches_sklearn_on_random_data_with_ties():
    p, y, u = _random_ctr_data()
    p64 = p.astype(np.float64)  # the metric stores float32: compare on the same values
    out = load_ctr_metric().compute(predictions=p, references=y, user_ids=u)

    gauc, used, skipped = _sklearn_gauc(p64, y, u)
    assert skipped >= 11  # the 11 constructed single-class users, plus any random ones
    assert out["auc"] == pytest.approx(sklearn_metrics.roc_auc_score(y, p64), rel=1e-12, abs=1e-12)
    assert out["gauc"] == pytest.approx(gauc, rel=1e-12, abs=1e-12)
    assert out["gauc_users"] == used
    assert out["gauc_skipped_users"] == skipped
    assert out["gauc_users"] + out["gauc_skipped_users"] == len(np.unique(u))
    expected_logloss = sklearn_metrics.log_loss(y, np.clip(p64, EPS, 1 - EPS))
    assert out["logloss"] == pytest.approx(expected_logloss, rel=1e-12)
    assert out["num_samples"] == len(y)
    assert out["positive_rate"] == pytest.approx(y.mean(), rel=1e-15)
    assert all(type(out[k]) is float for k in ("auc", "gauc", "logloss", "positive_rate"))
    assert all(type(out[k]) is int for k in ("gauc_users", "gauc_skipped_users", "num_samples"))


def test_logloss_clips_hard_zero_and_one():
    p = np.array([0.0, 1.0, 1.0, 0.0, 0.5], dtype=np.float32)  # two confident mistakes, two confident hits
    y = np.array([1, 0, 1, 0, 1])
    out = load_ctr_metric().compute(predictions=p, references=y, user_ids=[0] * 5)
    expected = -(2 * math.log(EPS) + 2 * math.log(1 - EPS) + math.log(0.5)) / 5
    assert math.isfinite(out["logloss"])
    assert out["logloss"] == pytest.approx(expected, rel=1e-6)
    assert out["logloss"] == pytest.approx(sklearn_metrics.log_loss(y, np.clip(p.astype(float), EPS, 1 - EPS)))


def test_add_batch_in_several_batches_equals_one_compute():
    p, y, u = _random_ctr_data(seed=1, n=2000, n_users=150)
    once = load_ctr_metric().compute(predictions=p, references=y, user_ids=u)

    metric = load_ctr_metric()
    for lo, hi in [(0, 1), (1, 700), (700, 701), (701, 1500), (1500, len(p))]:  # uneven, users split across batches
        metric.add_batch(predictions=p[lo:hi].tolist(), references=y[lo:hi].tolist(), user_ids=u[lo:hi].tolist())
    assert metric.compute() == once

    # Order does not matter (up to float summation order).
    perm = np.random.default_rng(2).permutation(len(p))
    shuffled = load_ctr_metric().compute(predictions=p[perm], references=y[perm], user_ids=u[perm])
    assert shuffled == pytest.approx(once, rel=1e-12)


def test_toy_case_by_hand():
    out = load_ctr_metric().compute(
        predictions=[0.9, 0.2, 0.6, 0.4], references=[1, 0, 0, 1], user_ids=[1, 1, 2, 2]
    )
    # Pairs (pos, neg): (.9,.2) (.9,.6) (.4,.2) win, (.4,.6) loses -> 3/4. User 1: 1.0, user 2: 0.0 -> (2*1 + 2*0) / 4.
    assert out["auc"] == 0.75
    assert out["gauc"] == 0.5
    assert (out["gauc_users"], out["gauc_skipped_users"]) == (2, 0)
    assert out["num_samples"] == 4 and out["positive_rate"] == 0.5


def test_toy_case_with_ties_and_a_skipped_user():
    out = load_ctr_metric().compute(
        predictions=[0.5, 0.5, 0.2, 0.7, 0.3, 0.4],
        references=[1, 0, 0, 0, 1, 1],
        user_ids=[10, 10, 10, 20, 20, 30],
    )
    # User 10: pos .5 vs negs .5 (tie, 1/2) and .2 (win) -> 0.75 over 3 impressions. User 20: .3 < .7 -> 0.0 over 2.
    # User 30 has one impression: skipped. GAUC = (3 * 0.75 + 2 * 0) / 5.
    assert out["gauc"] == pytest.approx(0.45, abs=1e-15)
    assert (out["gauc_users"], out["gauc_skipped_users"]) == (2, 1)
    # All pairs: pos {.5, .3, .4} vs neg {.5, .2, .7}: 1.5 + 1 + 1 wins out of 9.
    assert out["auc"] == pytest.approx(3.5 / 9, abs=1e-15)


def test_gauc_is_nan_when_no_user_has_both_classes():
    out = load_ctr_metric().compute(predictions=[0.9, 0.8, 0.1, 0.3], references=[1, 1, 0, 0], user_ids=[1, 1, 2, 3])
    assert math.isnan(out["gauc"])
    assert (out["gauc_users"], out["gauc_skipped_users"]) == (0, 3)
    assert out["auc"] == 1.0


@pytest.mark.parametrize(
    "predictions, references, match",
    [
        ([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 2], r"references must be 0 or 1; got 2 at index 3"),
        ([0.1, 0.2, 0.3, 0.4], [0, -1, 0, 1], r"got -1 at index 1"),
        ([0.1, 1.5, 0.3, 0.4], [0, 1, 0, 1], r"\[0, 1\].*1\.5 at index 1"),
        ([0.1, 0.2, -0.1, 0.4], [0, 1, 0, 1], r"at index 2"),
        ([0.1, 0.2, 0.3, float("nan")], [0, 1, 0, 1], r"NaN; got nan at index 3"),
        ([0.1, 0.2, 0.3, 0.4], [1, 1, 1, 1], r"same class \(1\)"),
        ([0.1, 0.2, 0.3, 0.4], [0, 0, 0, 0], r"same class \(0\)"),
    ],
)
def test_errors(predictions, references, match):
    metric = load_ctr_metric()
    with pytest.raises(ValueError, match=match):
        metric.compute(predictions=predictions, references=references, user_ids=[1, 1, 2, 2])


def test_single_class_raises_even_when_sklearn_only_warns():
    """Raising is a deliberate choice: depending on its version, sklearn raises or warns and returns nan."""
    metric = load_ctr_metric()
    with pytest.raises(ValueError, match=r"All 3 references are the same class \(1\): ROC AUC is undefined"):
        metric.compute(predictions=[0.1, 0.2, 0.3], references=[1, 1, 1], user_ids=[1, 2, 3])
