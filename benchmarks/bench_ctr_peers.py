"""CTR peer baselines on exactly the samples, features and split of `recipes/finetune_ctr.py`: LightGBM and DIN.

    python benchmarks/bench_ctr_peers.py --use_cases like engage --seeds 0 1 2 --peers lightgbm din \\
        --output benchmarks/results/ctr_peers.json

    pip install "lightgbm>=4" "deepctr-torch==0.3.0"     # or: pip install -e ".[bench]"

What is compared. For each use case (`like`, `love` on ML-1M; `engage`, `purchase` on the Taobao sample) and seed, the
data are built as the fine-tuning recipe builds them: the recipe's YAML config (`recipes/configs/<...>.yaml`) is parsed
with the recipe's own argument classes, `--seed` included, then `ctr_splits` gives the same train, validation and
test impressions (the seed picks the seeded subsets exactly as in `finetune_ctr.py --seed <k>`). Each impression's
history is what `CTRDataset` feeds our model: the user's `max_history` (50) most recent events strictly before it.
Test AUC, GAUC (by user) and log loss come from our own metric module (`pinfm_hf.evaluate_metrics.load_ctr_metric`).
Every choice (early stopping, epoch) is made on the validation slice; the test impressions are scored once.

Peers:

* `lightgbm`: gradient-boosted trees on the recipe's side features (`side_feature_fields`: ML-1M user age, gender,
  occupation and movie genres; Taobao item category), plus aggregates of each impression's own history window only
  (length, share of each action, positive rate, seconds since the last event, how often the candidate item and its
  category/genres occur in the window and with which actions) and statistics of the TRAIN split only (candidate item
  popularity and smoothed positive rate; the same for a high-cardinality side feature such as the Taobao category),
  out-of-fold on the train rows themselves so no row sees its own label. Early stopping on validation AUC.
* `din`: Deep Interest Network (`deepctr_torch.models.DIN`). The candidate (item id, a constant "candidate" action
  token, single-valued item features such as the category, a constant "now" time token) attends over the history
  window (item ids, their actions, their item features, their log-bucketed age at the impression, as our model's time
  features bucket gaps); user side features, multi-valued item features (genres) and the bucketed gap from the last
  history event are extra sparse inputs. Item and category vocabularies come from the train split (candidates and
  their history windows); others map to one unknown id. Trained epoch by epoch (at most 10, patience 2); the epoch
  with the best validation AUC is tested. Without the time inputs DIN lost ~6 AUC points on `engage` (seed 0).

Hyper-parameters (`LIGHTGBM_PARAMS`, `DIN_CONFIG`) were picked on the validation AUC of seed 0 (`like`, `engage`).

The JSON (`--output`) holds per use case `samples` (train/valid/test impressions of the first seed run) and `peers`
(one row per peer and seed: auc, gauc, logloss, best_iteration_or_epoch, seconds, features, valid_auc, samples).
`benchmarks/bench_ctr.py --peers_json` copies these rows next to our fine-tuning strategies. An existing `--output`
is updated, not replaced: rows of the same (peer, seed) are replaced, other rows and use cases stay. A Markdown table
(mean +- std over seeds) goes to stderr. Everything runs on `--threads` CPU threads (default 1).

`run_peer(use_case, peer, seed)` runs one row from another script.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy/torch start their thread pools

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
USE_CASES = {  # use case -> the fine-tuning config whose data the peers use
    "like": "ml1m_like.yaml",
    "love": "ml1m_love.yaml",
    "engage": "taobao_engage.yaml",
    "purchase": "taobao_purchase.yaml",
}
PEERS = ("lightgbm", "din")

# LightGBM side features: a field with at most this many values is one-hot (multi-valued) or categorical; above it
# (e.g. the Taobao category) it becomes train-split statistics (count, smoothed positive rate).
MAX_MULTI_HOT_VALUES = 64
MAX_CATEGORICAL_VALUES = 256
TARGET_ENCODING_SMOOTHING = 20.0  # pseudo-impressions at the train positive rate
TARGET_ENCODING_FOLDS = 5  # out-of-fold statistics for the train rows themselves

LIGHTGBM_PARAMS = {
    "objective": "binary",
    "metric": "auc",
    "learning_rate": 0.03,  # these three: best seed-0 validation AUC (like, engage) of five settings; AUC moved < 0.005
    "num_leaves": 15,
    "min_data_in_leaf": 200,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "cat_smooth": 10.0,
    "max_cat_to_onehot": 8,
    "verbose": -1,
    "deterministic": True,
    "force_row_wise": True,
}
LIGHTGBM_MAX_ROUNDS = 3000
LIGHTGBM_EARLY_STOPPING = 100

DIN_CONFIG = {
    "embedding_dim": 16,
    "dnn_hidden_units": (128, 64),
    "att_hidden_size": (64, 16),
    "dnn_dropout": 0.0,
    "l2_reg_embedding": 0.2,  # on whole tables each step; picked on seed-0 validation AUC (engage, like) of 1e-6 .. 1
    "batch_size": 256,
    "learning_rate": 1e-3,
    "max_epochs": 10,
    "patience": 2,  # epochs without a better validation AUC before stopping
    "time_features": True,  # history event ages and the gap to the last event, bucketed (our model sees time gaps too)
}
NUM_TIME_BUCKETS = 64


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def set_threads(threads: int) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------------
# Data: the recipe's samples, and each impression's history window
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class FlatSequences:
    """
    Every user's events as flat arrays in sequence order, the layout `CTRDataset` slices histories from: user `u`'s
    events are `offsets[u]:offsets[u + 1]`, and an impression's history its first `history_length` of them.
    """

    offsets: np.ndarray  # (num_users + 1,) int64
    items: pa.Array  # flat item ids
    actions: pa.Array  # flat action names
    timestamps: np.ndarray  # int64
    item_features: dict[str, pa.Array]  # flat per-event item feature strings (whitespace-separated values)

    @classmethod
    def from_sequences(cls, sequences) -> "FlatSequences":
        from pinfm_hf.data.sequences import sequence_table

        seq = sequence_table(sequences)
        lengths = pc.list_value_length(seq["item_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = {name: seq[name].combine_chunks().flatten() for name in seq.column_names if name != "user_id"}
        timestamps = flat.pop("timestamps").to_numpy(zero_copy_only=False).astype(np.int64)
        items, actions = flat.pop("item_ids"), flat.pop("actions")
        flat.pop("surfaces", None)
        features = {name: pc.fill_null(pc.cast(values, pa.string()), "") for name, values in flat.items()}
        if len(items) != offsets[-1] or any(len(v) != offsets[-1] for v in features.values()):
            raise ValueError("The sequences' list columns do not have one value per event.")
        return cls(offsets, items, actions, timestamps, features)

    @property
    def num_events(self) -> int:
        return int(self.offsets[-1])


def history_windows(samples: pa.Table, flat: FlatSequences, max_history: int) -> tuple[np.ndarray, np.ndarray]:
    """
    Flat `[start, end)` of each impression's history, as `CTRDataset.__getitem__` takes it: the user's events before
    position `history_length` (all strictly before the impression), at most the `max_history` most recent.
    """
    user = samples["user_index"].to_numpy().astype(np.int64)
    first = flat.offsets[user]
    end = first + samples["history_length"].to_numpy().astype(np.int64)
    if (end > flat.offsets[user + 1]).any():
        raise ValueError("`history_length` runs past the user's sequence: samples and sequences differ.")
    start = np.maximum(end - max_history, first)
    has = end > start
    if (flat.timestamps[end[has] - 1] >= samples["timestamp"].to_numpy()[has]).any():
        raise ValueError("A history window reaches the impression's timestamp (leakage).")
    return start, end


def split_values(column) -> pa.ListArray:
    """Whitespace-separated values of a string column, one list per row (blank -> no value), as the encoder splits."""
    column = pc.fill_null(pc.cast(column, pa.string()), "")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(column))
    flat = values.flatten()
    keep = pc.greater(pc.utf8_length(flat), 0)
    if pc.all(keep).as_py() is not False:
        return values
    offsets = values.offsets.to_numpy().astype(np.int64)
    keep_np = keep.to_numpy(zero_copy_only=False)
    kept_before = np.concatenate([[0], np.cumsum(keep_np)])
    new_offsets = kept_before[offsets - offsets[0]]
    return pa.ListArray.from_arrays(pa.array(new_offsets, pa.int32()), flat.filter(keep))


def _codes(values, vocabulary: pa.Array) -> np.ndarray:
    """Index of each value in `vocabulary`, -1 when absent."""
    index = pc.index_in(values, value_set=vocabulary)
    return pc.fill_null(index, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _window_counts(
    event_keys: np.ndarray, num_events: int, query_keys: np.ndarray, start: np.ndarray, end: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """
    For each query `i`: how many events `p` with key `query_keys[i]` lie in `[start[i], end[i])`, and the last such
    `p` (-1 when none). Events are sorted by `key * num_events + p`, so one query is two binary searches.
    """
    order = np.sort(event_keys)
    lo = np.searchsorted(order, query_keys * num_events + start)
    hi = np.searchsorted(order, query_keys * num_events + end)
    count = hi - lo
    last = np.full(len(query_keys), -1, dtype=np.int64)
    found = count > 0
    last[found] = order[hi[found] - 1] - query_keys[found] * num_events
    return count, last


def history_features(
    samples: pa.Table,
    flat: FlatSequences,
    *,
    max_history: int,
    positive_actions,
    negative_actions,
) -> dict[str, np.ndarray]:
    """
    Aggregates of each impression's own history window (see `history_windows`), and of nothing else: no event at or
    after the impression, no label, no other impression. Returns float64 columns (NaN: undefined, e.g. a rate over
    no event):

    * `hist_len`: events in the window; `hist_share_<action>`: share of each action; `hist_pos_rate`: positives over
      impressions (positive or negative actions) in the window; `hist_secs_since_last`: impression time minus the
      last window event's time.
    * `item_hist_count`, `item_hist_count_<action>`: window events of the candidate item (of each action);
      `item_hist_secs_since_last`: since its last one.
    * per item feature `F` (Taobao `category`, ML-1M `genre`), summed over the candidate's values: `F_hist_count`,
      `F_hist_count_<action>`, `F_hist_pos_rate`, and `F_hist_share_max` (the largest share of the window held by one
      of the candidate's values).
    """
    start, end = history_windows(samples, flat, max_history)
    n, num_events = samples.num_rows, flat.num_events
    length = (end - start).astype(np.float64)
    candidate_ts = samples["timestamp"].to_numpy().astype(np.int64)
    actions = sorted(pc.unique(flat.actions).to_pylist())
    action_code = _codes(flat.actions, pa.array(actions, pa.string()))
    num_actions = len(actions)
    is_positive = pc.is_in(flat.actions, value_set=pa.array(list(positive_actions), pa.string())).to_numpy(zero_copy_only=False)
    is_impression = is_positive | pc.is_in(
        flat.actions, value_set=pa.array(list(negative_actions), pa.string())
    ).to_numpy(zero_copy_only=False)

    def window_sum(per_event: np.ndarray) -> np.ndarray:
        cumulative = np.concatenate([[0], np.cumsum(per_event, dtype=np.int64)])
        return (cumulative[end] - cumulative[start]).astype(np.float64)

    with np.errstate(invalid="ignore", divide="ignore"):
        out: dict[str, np.ndarray] = {"hist_len": length}
        for a, name in enumerate(actions):
            out[f"hist_share_{name}"] = window_sum(action_code == a) / length
        out["hist_pos_rate"] = window_sum(is_positive) / window_sum(is_impression)
        last_ts = flat.timestamps[np.maximum(end - 1, 0)]
        out["hist_secs_since_last"] = np.where(end > start, candidate_ts - last_ts, np.nan).astype(np.float64)

        # The candidate item in its window, per action.
        vocabulary = pc.unique(flat.items)
        event_item = _codes(flat.items, vocabulary)
        candidate_item = _codes(samples["item_id"].combine_chunks(), vocabulary)
        if (candidate_item < 0).any():
            raise ValueError("A candidate item does not occur in the sequences: samples and sequences differ.")
        position = np.arange(num_events, dtype=np.int64)
        keys = (event_item * num_actions + action_code) * num_events + position
        total, last = np.zeros(n), np.full(n, -1, dtype=np.int64)
        for a, name in enumerate(actions):
            count, last_a = _window_counts(keys, num_events, candidate_item * num_actions + a, start, end)
            out[f"item_hist_count_{name}"] = count.astype(np.float64)
            total += count
            last = np.maximum(last, last_a)
        out["item_hist_count"] = total
        out["item_hist_secs_since_last"] = np.where(last >= 0, candidate_ts - flat.timestamps[np.maximum(last, 0)], np.nan)

        # Each item feature: the candidate's values in its window (a value per event and per candidate, or several).
        for field, event_strings in flat.item_features.items():
            if field not in samples.column_names:
                continue
            event_values = split_values(event_strings)
            vocabulary = pc.unique(event_values.flatten())
            value_code = _codes(event_values.flatten(), vocabulary)
            event_of_value = np.repeat(position, pc.list_value_length(event_values).to_numpy(zero_copy_only=False))
            keys = (value_code * num_actions + action_code[event_of_value]) * num_events + event_of_value
            candidate_values = split_values(samples[field])
            pair_code = _codes(candidate_values.flatten(), vocabulary)  # -1: a value no event has (cannot match)
            pair_row = np.repeat(np.arange(n), pc.list_value_length(candidate_values).to_numpy(zero_copy_only=False))
            known = pair_code >= 0
            pair_code, pair_row = pair_code[known], pair_row[known]
            pair_total = np.zeros(len(pair_code))
            positives = np.zeros(n)
            impressions = np.zeros(n)
            field_total = np.zeros(n)
            for a, name in enumerate(actions):
                count, _ = _window_counts(keys, num_events, pair_code * num_actions + a, start[pair_row], end[pair_row])
                per_row = np.bincount(pair_row, weights=count, minlength=n)
                out[f"{field}_hist_count_{name}"] = per_row
                field_total += per_row
                pair_total += count
                if name in positive_actions:
                    positives += per_row
                if name in positive_actions or name in negative_actions:
                    impressions += per_row
            out[f"{field}_hist_count"] = field_total
            out[f"{field}_hist_pos_rate"] = positives / impressions
            share_max = np.zeros(n)
            np.maximum.at(share_max, pair_row, pair_total)
            out[f"{field}_hist_share_max"] = share_max / length
    return out


@dataclass
class UseCaseData:
    use_case: str
    dataset: str
    seed: int
    max_history: int
    positive_actions: list[str]
    negative_actions: list[str]
    side_fields: list[str]
    item_fields: list[str]  # side fields that are item features (also in the sequences)
    flat: FlatSequences
    train: pa.Table
    valid: pa.Table
    test: pa.Table
    max_slots_per_field: int

    @property
    def samples(self) -> dict[str, int]:
        return {"train": self.train.num_rows, "valid": self.valid.num_rows, "test": self.test.num_rows}


def recipe_data_arguments(use_case: str, seed: int):
    """The recipe's own parse of its config with `--seed seed`: `(CTRDataArguments, CTRTrainingArguments)`."""
    from pinfm_hf import PretrainingObjective
    from pinfm_hf.arguments import CTRDataArguments, CTRModelArguments, CTRTrainingArguments
    from pinfm_hf.hub import HubArguments
    from pinfm_hf.training_utils import parse_recipe_args

    data_args, _, _, train_args, _ = parse_recipe_args(
        (CTRDataArguments, CTRModelArguments, PretrainingObjective, CTRTrainingArguments, HubArguments),
        ["--config", str(CONFIGS / USE_CASES[use_case]), "--seed", str(seed)],
    )
    if not Path(data_args.data_dir).is_absolute():  # the configs' data_dir is relative to the repository root
        data_args.data_dir = str(ROOT / data_args.data_dir)
    return data_args, train_args


@functools.lru_cache(maxsize=2)
def load_use_case(use_case: str, seed: int) -> UseCaseData:
    """The train/validation/test impressions of `recipes/finetune_ctr.py::load_data` for this config and seed."""
    from pinfm_hf.data import side_feature_fields

    data_args, train_args = recipe_data_arguments(use_case, seed)
    if data_args.validation_cut_quantile is None:
        raise ValueError(f"{USE_CASES[use_case]} has no validation_cut_quantile: the peers need a validation slice.")
    positive_actions, negative_actions = data_args.actions()
    events, splits = data_args.load_splits(train_args.seed)
    side_fields = side_feature_fields(splits.train) if data_args.side_features else []
    flat = FlatSequences.from_sequences(splits.sequences)
    return UseCaseData(
        use_case=use_case, dataset=data_args.dataset, seed=train_args.seed, max_history=data_args.max_history,
        positive_actions=list(positive_actions), negative_actions=list(negative_actions), side_fields=side_fields,
        item_fields=[f for f in side_fields if f in events.item_features], flat=flat,
        train=splits.train, valid=splits.valid, test=splits.test, max_slots_per_field=data_args.max_slots_per_field,
    )


def ctr_metrics(probs: np.ndarray, labels: np.ndarray, user_index: np.ndarray) -> dict[str, float]:
    from pinfm_hf.evaluate_metrics import load_ctr_metric

    result = load_ctr_metric(keep_in_memory=True).compute(
        predictions=np.asarray(probs, dtype=np.float64), references=labels.astype(np.int64), user_ids=user_index.astype(np.int64)
    )
    return {k: float(result[k]) for k in ("auc", "gauc", "logloss")}


def _auc(probs: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, probs))


# ----------------------------------------------------------------------------------------------------------------------
# LightGBM
# ----------------------------------------------------------------------------------------------------------------------


def target_statistics(
    train_codes: np.ndarray, train_labels: np.ndarray, query_codes: np.ndarray, prior: float
) -> tuple[np.ndarray, np.ndarray]:
    """Train impressions of each query code and their positive rate smoothed towards `prior` (code -1: unseen)."""
    size = max(int(train_codes.max(initial=-1)), int(query_codes.max(initial=-1))) + 2
    counts = np.bincount(train_codes + 1, minlength=size).astype(np.float64)
    positives = np.bincount(train_codes + 1, weights=train_labels, minlength=size)
    counts[0] = positives[0] = 0.0  # code -1 (not in the vocabulary) has no statistics
    c, p = counts[query_codes + 1], positives[query_codes + 1]
    return c, (p + TARGET_ENCODING_SMOOTHING * prior) / (c + TARGET_ENCODING_SMOOTHING)


def encode_target_statistics(
    name: str, codes: dict[str, np.ndarray], labels: np.ndarray, seed: int
) -> dict[str, dict[str, np.ndarray]]:
    """
    `<name>_train_count` and `<name>_train_pos_rate` from the train split: valid/test rows get the full train
    statistics, each train row those of the other folds (counts scaled to the full split), never its own label.
    """
    train = codes["train"]
    out = {part: {} for part in codes}
    for part in codes:
        if part == "train":
            continue
        count, rate = target_statistics(train, labels, codes[part], float(labels.mean()))
        out[part] = {f"{name}_train_count": count, f"{name}_train_pos_rate": rate}
    fold = np.random.default_rng(seed).integers(0, TARGET_ENCODING_FOLDS, len(train))
    count, rate = np.zeros(len(train)), np.zeros(len(train))
    for k in range(TARGET_ENCODING_FOLDS):
        held = fold == k
        c, r = target_statistics(train[~held], labels[~held], train[held], float(labels[~held].mean()))
        count[held] = c * TARGET_ENCODING_FOLDS / (TARGET_ENCODING_FOLDS - 1)
        rate[held] = r
    out["train"] = {f"{name}_train_count": count, f"{name}_train_pos_rate": rate}
    return out


def lightgbm_features(data: UseCaseData) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """
    Feature matrices `{"train", "valid", "test"}` (float64), their column names, and the categorical ones: side
    features, train-split statistics and history-window aggregates (`history_features`).
    """
    parts = {"train": data.train, "valid": data.valid, "test": data.test}
    columns: dict[str, dict[str, np.ndarray]] = {part: {} for part in parts}
    categorical: list[str] = []
    labels = data.train["label"].to_numpy().astype(np.float64)

    # Side features, typed on the train split.
    for field in data.side_fields:
        values = {part: split_values(table[field]) for part, table in parts.items()}
        vocabulary = pc.unique(values["train"].flatten())
        longest = int(pc.max(pc.list_value_length(values["train"])).as_py() or 0)
        if longest > 1 and len(vocabulary) <= MAX_MULTI_HOT_VALUES:
            for part, v in values.items():
                code = _codes(v.flatten(), vocabulary)
                row = np.repeat(np.arange(len(v)), pc.list_value_length(v).to_numpy(zero_copy_only=False))
                hot = np.zeros((len(v), len(vocabulary)))
                hot[row[code >= 0], code[code >= 0]] = 1.0
                for j, value in enumerate(vocabulary.to_pylist()):
                    columns[part][f"{field}={value}"] = hot[:, j]
        else:
            first = {part: _codes(pc.list_element(v, 0) if longest else v.flatten(), vocabulary)
                     for part, v in values.items()}
            if len(vocabulary) <= MAX_CATEGORICAL_VALUES:
                for part, code in first.items():
                    columns[part][field] = np.where(code >= 0, code, np.nan).astype(np.float64)
                categorical.append(field)
            else:
                for part, stats in encode_target_statistics(field, first, labels, data.seed).items():
                    columns[part].update(stats)

    # The candidate item: popularity and positive rate in the train split.
    vocabulary = pc.unique(data.train["item_id"])
    codes = {part: _codes(table["item_id"], vocabulary) for part, table in parts.items()}
    for part, stats in encode_target_statistics("item", codes, labels, data.seed).items():
        columns[part].update(stats)

    # The history window.
    for part, table in parts.items():
        columns[part].update(history_features(
            table, data.flat, max_history=data.max_history, positive_actions=data.positive_actions,
            negative_actions=data.negative_actions,
        ))
    # Columns constant on the train split carry nothing (e.g. ML-1M never rates a movie twice: item_hist_*).
    names = [name for name, v in columns["train"].items()
             if not (np.all(np.isnan(v)) or np.nanmin(v) == np.nanmax(v))]
    categorical = [name for name in categorical if name in names]
    matrices = {part: np.column_stack([columns[part][name] for name in names]) for part in parts}
    return matrices, names, categorical


def run_lightgbm(data: UseCaseData, seed: int, threads: int = 1) -> dict:
    import lightgbm as lgb

    matrices, names, categorical = lightgbm_features(data)
    y = {part: table["label"].to_numpy().astype(np.float64)
         for part, table in (("train", data.train), ("valid", data.valid), ("test", data.test))}
    params = {**LIGHTGBM_PARAMS, "num_threads": threads, "seed": seed}
    train_set = lgb.Dataset(matrices["train"], y["train"], feature_name=names, categorical_feature=categorical,
                            free_raw_data=False)
    valid_set = lgb.Dataset(matrices["valid"], y["valid"], reference=train_set)
    booster = lgb.train(
        params, train_set, num_boost_round=LIGHTGBM_MAX_ROUNDS, valid_sets=[valid_set], valid_names=["valid"],
        callbacks=[lgb.early_stopping(LIGHTGBM_EARLY_STOPPING, first_metric_only=True, verbose=False)],
    )
    best = booster.best_iteration
    valid_probs = booster.predict(matrices["valid"], num_iteration=best)
    test_probs = booster.predict(matrices["test"], num_iteration=best)
    gain = booster.feature_importance(importance_type="gain", iteration=best)
    share = gain / max(gain.sum(), 1e-12)
    top = sorted(zip(names, share), key=lambda x: -x[1])[:10]
    return {
        "metrics": ctr_metrics(test_probs, y["test"], data.test["user_index"].to_numpy()),
        "valid_auc": _auc(valid_probs, y["valid"]),
        "best_iteration_or_epoch": int(best),
        "features": names,
        "top_features_by_gain": {name: round(float(s), 4) for name, s in top},
    }


# ----------------------------------------------------------------------------------------------------------------------
# DIN (deepctr-torch)
# ----------------------------------------------------------------------------------------------------------------------


def _window_matrix(event_codes: np.ndarray, start: np.ndarray, end: np.ndarray, width: int) -> np.ndarray:
    """`(n, width)` codes of each window's events in time order, left-aligned, padded with 0."""
    index = start[:, None] + np.arange(width)[None, :]
    valid = index < end[:, None]
    return np.where(valid, event_codes[np.minimum(index, len(event_codes) - 1)], 0)


def _window_mask(num_events: int, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Events that lie in at least one window."""
    marks = np.zeros(num_events + 1, dtype=np.int64)
    np.add.at(marks, start, 1)
    np.add.at(marks, end, -1)
    return np.cumsum(marks[:-1]) > 0


def time_bucket(seconds: np.ndarray) -> np.ndarray:
    """Log-scaled time-gap bucket, as our model's time features: bucket `b` covers gaps of about `2**(b / 2)` seconds."""
    seconds = np.maximum(np.asarray(seconds, dtype=np.float64), 0.0)
    return np.minimum(np.floor(2.0 * np.log2(1.0 + seconds)), NUM_TIME_BUCKETS - 1).astype(np.int64)


def din_inputs(data: UseCaseData, embedding_dim: int, cfg_time: bool = True):
    """
    deepctr-torch feature columns, the history-attention feature list and `{part: {feature: array}}`. Item and
    single-valued item-feature ids: 0 padding, 1 unknown (not in the train split's candidates or history windows).
    """
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat

    from pinfm_hf.data import CTRFeatureEncoder

    flat, H = data.flat, data.max_history
    parts = {"train": data.train, "valid": data.valid, "test": data.test}
    windows = {part: history_windows(table, flat, H) for part, table in parts.items()}
    in_train_window = _window_mask(flat.num_events, *windows["train"])

    inputs: dict[str, dict[str, np.ndarray]] = {part: {} for part in parts}
    columns, history = [], []

    def add_sequence_feature(name: str, event_values: pa.Array, candidate_values: dict[str, pa.Array]) -> None:
        vocabulary = pc.unique(pa.concat_arrays([candidate_values["train"], event_values.filter(pa.array(in_train_window))]))
        event_codes = _codes(event_values, vocabulary) + 2  # -1 (unknown) -> 1
        columns.append(SparseFeat(name, len(vocabulary) + 2, embedding_dim))
        columns.append(VarLenSparseFeat(SparseFeat(f"hist_{name}", len(vocabulary) + 2, embedding_dim, embedding_name=name),
                                        maxlen=H, combiner="sum", length_name="hist_len"))
        history.append(name)
        for part in parts:
            inputs[part][name] = _codes(candidate_values[part], vocabulary) + 2
            inputs[part][f"hist_{name}"] = _window_matrix(event_codes, *windows[part], H)

    # Candidate item / history items.
    add_sequence_feature("item_id", flat.items, {p: t["item_id"].combine_chunks() for p, t in parts.items()})
    # Single-valued item features (Taobao category): candidate value / history values.
    single_item_fields = []
    for field in data.item_fields:
        event_values = split_values(flat.item_features[field])
        if int(pc.max(pc.list_value_length(event_values)).as_py() or 0) <= 1:
            single_item_fields.append(field)
            add_sequence_feature(field, pc.utf8_trim_whitespace(flat.item_features[field]),
                                 {p: pc.utf8_trim_whitespace(pc.fill_null(pc.cast(t[field], pa.string()), "").combine_chunks())
                                  for p, t in parts.items()})
    # Actions: the history's, and a constant "candidate" action as the query (the candidate's own action is the label).
    actions = sorted(pc.unique(flat.actions).to_pylist())
    action_codes = _codes(flat.actions, pa.array(actions, pa.string())) + 1
    candidate_action = len(actions) + 1
    columns.append(SparseFeat("action", len(actions) + 2, embedding_dim))
    columns.append(VarLenSparseFeat(SparseFeat("hist_action", len(actions) + 2, embedding_dim, embedding_name="action"),
                                    maxlen=H, combiner="sum", length_name="hist_len"))
    history.append("action")
    for part, table in parts.items():
        inputs[part]["action"] = np.full(table.num_rows, candidate_action, dtype=np.int64)
        inputs[part]["hist_action"] = _window_matrix(action_codes, *windows[part], H)
        start, end = windows[part]
        inputs[part]["hist_len"] = (end - start).astype(np.int64)
    if cfg_time:
        # Time, as our model's time-gap features see it: each history event's log-bucketed age at the impression (the
        # query is a constant "now" token), and the gap from the last history event to the impression.
        columns.append(SparseFeat("age", NUM_TIME_BUCKETS + 2, embedding_dim))
        columns.append(VarLenSparseFeat(SparseFeat("hist_age", NUM_TIME_BUCKETS + 2, embedding_dim, embedding_name="age"),
                                        maxlen=H, combiner="sum", length_name="hist_len"))
        history.append("age")
        columns.append(SparseFeat("gap_last", NUM_TIME_BUCKETS + 2, embedding_dim))
        for part, table in parts.items():
            start, end = windows[part]
            candidate_ts = table["timestamp"].to_numpy().astype(np.int64)
            index = start[:, None] + np.arange(H)[None, :]
            valid = index < end[:, None]
            ages = candidate_ts[:, None] - flat.timestamps[np.minimum(index, flat.num_events - 1)]
            inputs[part]["age"] = np.ones(table.num_rows, dtype=np.int64)  # "now"
            inputs[part]["hist_age"] = np.where(valid, time_bucket(ages) + 2, 0)
            last = np.where(end > start, candidate_ts - flat.timestamps[np.maximum(end - 1, 0)], -1)
            inputs[part]["gap_last"] = np.where(last >= 0, time_bucket(np.maximum(last, 0)) + 2, 1)  # 1: no history
    # Other side features (user features, multi-valued item features such as genres), with the recipe's encoder.
    other = [f for f in data.side_fields if f not in single_item_fields]
    if other:
        encoder = CTRFeatureEncoder.fit(data.train, other, max_slots_per_field=data.max_slots_per_field)
        encoded = {part: encoder.encode(table) for part, table in parts.items()}
        column = 0
        for field, width in zip(encoder.fields, encoder.slots):
            name = f"side_{field}"
            if width == 1:
                columns.append(SparseFeat(name, encoder.vocab_size, embedding_dim))
            else:
                columns.append(VarLenSparseFeat(SparseFeat(name, encoder.vocab_size, embedding_dim), maxlen=width,
                                                combiner="mean"))
            for part in parts:
                block = encoded[part][:, column : column + width]
                inputs[part][name] = block[:, 0] if width == 1 else block
            column += width
    return columns, history, inputs


def run_din(data: UseCaseData, seed: int, threads: int = 1, config: Optional[dict] = None) -> dict:
    """DIN on `data`: the epoch with the best validation AUC is tested. `config` overrides `DIN_CONFIG` entries."""
    import torch
    from deepctr_torch.models import DIN

    cfg = {**DIN_CONFIG, **(config or {})}
    torch.manual_seed(seed)
    np.random.seed(seed)
    columns, history, inputs = din_inputs(data, cfg["embedding_dim"], cfg["time_features"])
    y = {part: table["label"].to_numpy().astype(np.float32)
         for part, table in (("train", data.train), ("valid", data.valid), ("test", data.test))}
    model = DIN(
        columns, history, dnn_hidden_units=cfg["dnn_hidden_units"], att_hidden_size=cfg["att_hidden_size"],
        dnn_dropout=cfg["dnn_dropout"], l2_reg_embedding=cfg["l2_reg_embedding"], seed=seed, task="binary", device="cpu",
    )
    model.compile(torch.optim.Adam(model.parameters(), lr=cfg["learning_rate"]), "binary_crossentropy")
    names = list(model.feature_index)
    x = {part: [inputs[part][name] for name in names] for part in inputs}

    def predict(part: str) -> np.ndarray:
        with contextlib.redirect_stdout(io.StringIO()):
            return model.predict([a.copy() for a in x[part]], batch_size=2048).reshape(-1)

    best_auc, best_epoch, best_state, history_auc = -math.inf, 0, None, []
    for epoch in range(1, cfg["max_epochs"] + 1):
        started = time.time()
        with contextlib.redirect_stdout(io.StringIO()):  # deepctr prints its device and sizes
            model.fit([a.copy() for a in x["train"]], y["train"], batch_size=cfg["batch_size"], epochs=1, verbose=0,
                      shuffle=True)
        auc = _auc(predict("valid"), y["valid"])
        history_auc.append(round(auc, 5))
        log(f"  din {data.use_case} seed {seed} epoch {epoch}: valid AUC {auc:.4f} ({time.time() - started:.0f}s)")
        if auc > best_auc:
            best_auc, best_epoch, best_state = auc, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg["patience"]:
            break
    model.load_state_dict(best_state)
    test_probs = predict("test")
    return {
        "metrics": ctr_metrics(test_probs, y["test"], data.test["user_index"].to_numpy()),
        "valid_auc": best_auc,
        "valid_auc_per_epoch": history_auc,
        "best_iteration_or_epoch": best_epoch,
        "features": [n for n in names if n != "hist_len"],
        "history_features": history,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
    }


# ----------------------------------------------------------------------------------------------------------------------
# Runs, report
# ----------------------------------------------------------------------------------------------------------------------


def run_peer(use_case: str, peer: str, seed: int, threads: int = 1) -> dict:
    """One peer on one use case and seed: the JSON row (name, seed, auc, gauc, logloss, best_iteration_or_epoch, ...)."""
    if use_case not in USE_CASES:
        raise ValueError(f"Unknown use case {use_case!r}; choose from {sorted(USE_CASES)}.")
    if peer not in PEERS:
        raise ValueError(f"Unknown peer {peer!r}; choose from {list(PEERS)}.")
    set_threads(threads)
    data = load_use_case(use_case, seed)
    started = time.time()
    result = (run_lightgbm if peer == "lightgbm" else run_din)(data, seed, threads)
    seconds = time.time() - started
    metrics = result.pop("metrics")
    row = {
        "name": peer,
        "seed": seed,
        **{k: round(v, 5) for k, v in metrics.items()},
        "best_iteration_or_epoch": result.pop("best_iteration_or_epoch"),
        "seconds": round(seconds, 1),
        "features": result.pop("features"),
        "valid_auc": round(result.pop("valid_auc"), 5),
        "samples": data.samples,
        **result,
    }
    log(f"{use_case} {peer} seed {seed}: AUC {row['auc']:.4f} GAUC {row['gauc']:.4f} logloss {row['logloss']:.4f} "
        f"(valid AUC {row['valid_auc']:.4f}, best {row['best_iteration_or_epoch']}, {seconds:.0f}s)")
    return row


def _mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}"


def summary_table(report: dict, use_cases: list[str]) -> str:
    lines = ["| use case | peer | seeds | AUC | GAUC | logloss | best iteration/epoch | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for use_case in use_cases:
        groups: dict[str, list[dict]] = {}
        for row in report.get(use_case, {}).get("peers", []):
            groups.setdefault(row["name"], []).append(row)
        for name, rows in groups.items():
            lines.append(
                f"| {use_case} | {name} | {len(rows)} | " + " | ".join(_mean_std([r[k] for r in rows]) for k in ("auc", "gauc", "logloss"))
                + f" | {statistics.fmean(r['best_iteration_or_epoch'] for r in rows):.0f} "
                f"| {statistics.fmean(r['seconds'] for r in rows):.0f} |"
            )
    return "\n".join(lines)


def write_json_atomically(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--use_cases", nargs="+", default=["like", "engage"], choices=list(USE_CASES),
                        help="Use cases (each reads its fine-tuning config under recipes/configs/).")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="Seeds, as finetune_ctr.py --seed: the same seed gives the same train/valid/test rows.")
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch, LightGBM). Default 1.")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON to write; an existing file is updated (same peer+seed rows replaced, others kept).")
    args = parser.parse_args(argv)
    set_threads(args.threads)

    report = json.loads(args.output.read_text()) if args.output and args.output.exists() else {}
    for use_case in args.use_cases:
        rows = []
        for seed in args.seeds:
            for peer in args.peers:
                rows.append(run_peer(use_case, peer, seed, threads=args.threads))
            load_use_case.cache_clear()
        entry = report.get(use_case, {})
        done = {(r["name"], r["seed"]) for r in rows}
        kept = [r for r in entry.get("peers", []) if (r["name"], r["seed"]) not in done]
        report[use_case] = {
            "config": USE_CASES[use_case],
            "samples": rows[0]["samples"],
            "peers": sorted(kept + rows, key=lambda r: (PEERS.index(r["name"]) if r["name"] in PEERS else 99, r["seed"])),
        }
        if args.output:  # after each use case, so a later failure keeps what is done
            write_json_atomically(args.output, report)
    log("\n" + summary_table(report, args.use_cases))
    return report


if __name__ == "__main__":
    main()
