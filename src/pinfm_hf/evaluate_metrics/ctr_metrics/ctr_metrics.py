# Copyright 2025 The pinfm-hf authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""CTR metrics: ROC AUC, group (per-user) AUC and log loss.

This script is self-contained (it imports only `evaluate`, `datasets` and `numpy`) because `evaluate.load` copies it
into its dynamic-modules cache and imports it from there.
"""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Click-through-rate (CTR) metrics for binary predictions, computed in one pass over the same stored inputs:

    - `auc`: ROC AUC over all samples. Tied scores get half credit, exactly as `sklearn.metrics.roc_auc_score`; it is
      computed from mid-ranks (Mann-Whitney U) in O(n log n).
    - `gauc`: group AUC. The AUC of each user's own impressions, averaged over users weighted by their number of
      impressions: `gauc = sum_u n_u * auc_u / sum_u n_u`. Users whose impressions are all of one class have no AUC and
      are skipped (counted in `gauc_skipped_users`). Computed for all users at once with one sort, no loop over users.
    - `logloss`: mean binary cross-entropy, probabilities clipped to [1e-7, 1 - 1e-7] first (the value of
      `sklearn.metrics.log_loss` on the clipped probabilities).

Predictions are stored as float32 and compared/accumulated in float64.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): Predicted click probabilities, each in [0, 1] (NaN is an error). Stored as float32.
    references (`list` of `int`): Ground-truth labels, each 0 or 1.
    user_ids (`list` of `int`): The user (int64) of each impression; GAUC groups by it.
Returns:
    auc (`float`): ROC AUC over all samples.
    gauc (`float`): Impression-weighted mean of the per-user AUCs over users with both classes; `nan` if no user has
        both classes.
    gauc_users (`int`): Number of users that entered GAUC.
    gauc_skipped_users (`int`): Number of users skipped because all their references are of one class.
    logloss (`float`): Mean binary cross-entropy with probabilities clipped to [1e-7, 1 - 1e-7].
    num_samples (`int`): Number of samples.
    positive_rate (`float`): Fraction of references equal to 1.
Raises:
    ValueError: a reference is not 0 or 1, a prediction is outside [0, 1] or NaN (the message names the first
        offending index), there are no samples, or all references are of the same class (AUC is undefined; recent
        `sklearn.metrics.roc_auc_score` warns and returns nan there instead).
Examples:
    >>> ctr = evaluate.load("path/to/ctr_metrics")
    >>> results = ctr.compute(
    ...     predictions=[0.9, 0.2, 0.6, 0.4],
    ...     references=[1, 0, 0, 1],
    ...     user_ids=[1, 1, 2, 2],
    ... )
    >>> print(results["auc"], results["gauc"], results["gauc_users"])
    0.75 0.5 2
"""

_CITATION = """\
@inproceedings{zhou2018din,
  title={Deep Interest Network for Click-Through Rate Prediction},
  author={Zhou, Guorui and Zhu, Xiaoqiang and Song, Chenru and Fan, Ying and Zhu, Han and Ma, Xiao and Yan, Yanghui
          and Jin, Junqi and Li, Han and Gai, Kun},
  booktitle={Proceedings of the 24th ACM SIGKDD International Conference on Knowledge Discovery \\& Data Mining},
  pages={1059--1068},
  year={2018}
}

@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and Grisel, O. and Blondel, M.
          and Prettenhofer, P. and Weiss, R. and Dubourg, V. and Vanderplas, J. and Passos, A. and Cournapeau, D. and
          Brucher, M. and Perrot, M. and Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""

LOGLOSS_EPS = 1e-7


def _check_inputs(predictions, references, user_ids):
    predictions = np.asarray(predictions, dtype=np.float64).reshape(-1)
    references = np.asarray(references).reshape(-1)
    user_ids = np.asarray(user_ids).reshape(-1)
    n = predictions.shape[0]
    if references.shape[0] != n or user_ids.shape[0] != n:
        raise ValueError(
            f"predictions ({n}), references ({references.shape[0]}) and user_ids ({user_ids.shape[0]}) "
            "must have the same length."
        )
    if n == 0:
        raise ValueError("No samples: add predictions, references and user_ids before computing.")
    bad = np.flatnonzero((references != 0) & (references != 1))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"references must be 0 or 1; got {references[i].item()!r} at index {i} ({bad.size} invalid reference(s) in total)."
        )
    bad = np.flatnonzero(~((predictions >= 0.0) & (predictions <= 1.0)))  # NaN fails both comparisons
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"predictions must be probabilities in [0, 1] and not NaN; got {float(predictions[i])!r} at index {i} "
            f"({bad.size} invalid prediction(s) in total)."
        )
    return predictions, references.astype(np.int64), user_ids.astype(np.int64)


def _tie_midranks(new_group):
    """1-based mid-ranks of sorted values, given `new_group[i]` = value i starts a new tie group (`new_group[0]` True)."""
    n = new_group.shape[0]
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], n)
    group_midrank = (starts + ends + 1) / 2.0  # mean of the 1-based positions starts+1 .. ends
    return np.repeat(group_midrank, ends - starts)


def _roc_auc(predictions, references):
    """ROC AUC with half credit for ties: (sum of positive mid-ranks - P(P+1)/2) / (P N)."""
    order = np.argsort(predictions, kind="stable")
    s = predictions[order]
    y = references[order]
    new_group = np.empty(s.shape[0], dtype=bool)
    new_group[0] = True
    np.not_equal(s[1:], s[:-1], out=new_group[1:])
    ranks = _tie_midranks(new_group)
    n_pos = float(y.sum())
    n_neg = float(y.shape[0]) - n_pos
    rank_sum = float(ranks[y == 1].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _group_auc(predictions, references, user_ids):
    """Impression-weighted mean of per-user AUCs, vectorised over users with one lexsort."""
    order = np.lexsort((predictions, user_ids))  # by user, then by score
    u = user_ids[order]
    s = predictions[order]
    y = references[order].astype(np.float64)
    n = u.shape[0]

    new_user = np.empty(n, dtype=bool)
    new_user[0] = True
    np.not_equal(u[1:], u[:-1], out=new_user[1:])
    new_group = new_user.copy()
    new_group[1:] |= s[1:] != s[:-1]  # a tie group never spans two users

    user_index = np.cumsum(new_user) - 1  # dense 0..U-1 in sorted order
    user_start = np.flatnonzero(new_user)  # 0-based position of each user's first sample
    ranks = _tie_midranks(new_group) - user_start[user_index]  # 1-based mid-ranks within the user

    n_users = user_start.shape[0]
    count = np.bincount(user_index, minlength=n_users).astype(np.float64)
    n_pos = np.bincount(user_index, weights=y, minlength=n_users)
    n_neg = count - n_pos
    rank_sum = np.bincount(user_index, weights=ranks * y, minlength=n_users)

    eligible = (n_pos > 0) & (n_neg > 0)
    n_eligible = int(eligible.sum())
    if n_eligible == 0:
        return float("nan"), 0, n_users
    p, q = n_pos[eligible], n_neg[eligible]
    auc_u = (rank_sum[eligible] - p * (p + 1) / 2.0) / (p * q)
    w = count[eligible]
    return float(np.dot(w, auc_u) / w.sum()), n_eligible, n_users - n_eligible


def _log_loss(predictions, references, eps=LOGLOSS_EPS):
    p = np.clip(predictions, eps, 1.0 - eps)
    return float(-np.mean(np.where(references == 1, np.log(p), np.log1p(-p))))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CTRMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("float32"),
                    "references": datasets.Value("int64"),
                    "user_ids": datasets.Value("int64"),
                }
            ),
            # Hand `_compute` numpy arrays, not Python lists (1M rows as lists costs seconds).
            format="numpy",
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.roc_auc_score.html",
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.log_loss.html",
                "https://arxiv.org/abs/1706.06978",
            ],
        )

    def _compute(self, predictions, references, user_ids):
        predictions, references, user_ids = _check_inputs(predictions, references, user_ids)
        n_pos = int(references.sum())
        n = int(references.shape[0])
        if n_pos == 0 or n_pos == n:
            raise ValueError(
                f"All {n} references are the same class ({int(references[0])}): ROC AUC is undefined. "
                "Both classes 0 and 1 are needed."
            )
        gauc, gauc_users, gauc_skipped_users = _group_auc(predictions, references, user_ids)
        return {
            "auc": float(_roc_auc(predictions, references)),
            "gauc": gauc,
            "gauc_users": gauc_users,
            "gauc_skipped_users": gauc_skipped_users,
            "logloss": _log_loss(predictions, references),
            "num_samples": n,
            "positive_rate": n_pos / n,
        }
