"""Shared data loading, protocol split, metrics and reporting for the peer runners.

Imported by run_recbole.py and run_rectools.py, each in its own virtual environment: it needs only the standard
library, numpy, pandas and torch (never pinfm_hf), so that both peers read the data, split it and score it the same way.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[2]
KS = (10, 200)


@dataclass(frozen=True)
class DatasetSpec:
    """Per-data-set protocol: where the file is, sequence length, dropout, and whether it has a validation split."""

    relpath: str
    max_len: int
    dropout: float
    has_valid: bool
    protocol: str


DATASETS = {
    "ml-1m": DatasetSpec(
        "ml-1m/ml-1m.inter",
        max_len=200,
        dropout=0.2,
        has_valid=False,
        protocol=(
            "HSTU leave-one-out: per user in time order (ties keep file order), test target = last event, input = "
            "the 200 events before it; training on all events but the last; no validation; full ranking over all "
            "items with the input items excluded (target always rankable)"
        ),
    ),
    "sports": DatasetSpec(
        "amazon-sports/sports.csv",
        max_len=50,
        dropout=0.5,
        has_valid=True,
        protocol=(
            "S3-Rec/TiCoSeRec leave-last-two-out: per user in file order, training on all but the last two events, "
            "validation target = second-to-last (input = events before it), test target = last (input = the 50 "
            "events before it, validation event included); full ranking over all items with the input items "
            "excluded (target always rankable); epoch chosen on valid NDCG@10"
        ),
    ),
}


@dataclass
class EvalCase:
    """One ranking query: the model input (already cut to the last max_len events) and the held-out target."""

    user: int
    history: np.ndarray
    target: int


@dataclass
class Split:
    """The protocol's split: training sequences per user, validation queries (or None) and test queries."""

    train: dict[int, np.ndarray]
    valid: Optional[list[EvalCase]]
    test: list[EvalCase]
    num_items: int


def load_sequences(dataset: str, data_dir: Path, max_users: Optional[int]) -> tuple[dict[int, np.ndarray], int]:
    """Each user's item codes in time order; ties in time keep file order (a stable sort), as the protocol requires.

    Users and items become integer codes so that converted files need no quoting. With `max_users`, the first
    users in file order are kept (whole histories), for smoke tests.
    """
    spec = DATASETS[dataset]
    path = data_dir / spec.relpath
    if dataset == "ml-1m":  # RecBole atomic file; titles contain quotes, so no CSV quoting
        df = pd.read_csv(path, sep="\t", dtype=str, quoting=csv.QUOTE_NONE, usecols=[0, 1, 3])
    else:
        df = pd.read_csv(path, dtype=str, usecols=["user_id", "item_id", "timestamp"])
    df.columns = ["user", "item", "timestamp"]
    if max_users is not None:
        df = df[df["user"].isin(pd.unique(df["user"])[:max_users])]
    df = df.iloc[np.argsort(df["timestamp"].astype(float).to_numpy(), kind="stable")]
    items, _ = pd.factorize(df["item"])
    users, _ = pd.factorize(df["user"])
    by_user = np.argsort(users, kind="stable")  # keeps each user's time order
    cuts = np.flatnonzero(np.diff(users[by_user])) + 1
    runs = np.split((items[by_user] + 1).astype(np.int64), cuts)  # item codes start at 1: 0 is left for padding
    return dict(enumerate(runs)), int(items.max()) + 1  # codes 1..num_items


def split_protocol(sequences: dict[int, np.ndarray], dataset: str, num_items: int) -> Split:
    """Apply the data set's protocol; users too short for it are skipped (none are on the full data)."""
    spec = DATASETS[dataset]
    held_out = 2 if spec.has_valid else 1
    train: dict[int, np.ndarray] = {}
    valid: list[EvalCase] = []
    test: list[EvalCase] = []
    for user, seq in sequences.items():
        if len(seq) < held_out + 1:
            continue
        train[user] = seq[:-held_out]
        test.append(EvalCase(user, seq[:-1][-spec.max_len :], int(seq[-1])))
        if spec.has_valid:
            valid.append(EvalCase(user, seq[:-2][-spec.max_len :], int(seq[-2])))
    return Split(train, valid if spec.has_valid else None, test, num_items)


def metrics_from_ranks(ranks: np.ndarray) -> dict:
    """NDCG@10, HR@10, HR@200 from 1-based target ranks (np.inf = not ranked, e.g. an item the model never saw)."""
    ranks = np.asarray(ranks, dtype=float)
    ndcg = np.where(ranks <= 10, 1.0 / np.log2(ranks + 1.0), 0.0)
    return {
        "ndcg@10": float(ndcg.mean()) if len(ranks) else 0.0,
        "hr@10": float((ranks <= 10).mean()) if len(ranks) else 0.0,
        "hr@200": float((ranks <= 200).mean()) if len(ranks) else 0.0,
        "num_users": int(len(ranks)),
    }


def check_history_excluded(
    topk: Iterable[Sequence[int]], histories: Iterable[Iterable[int]], targets: Iterable[int], what: str
) -> None:
    """Fail loudly if a ranked list holds an item of the user's input other than the user's target.

    `histories` must come from the protocol split, not from the code that masked the scores, so that a broken
    exclusion (or a model input that differs from the protocol's) is caught.
    """
    bad = 0
    for items, history, target in zip(topk, histories, targets):
        seen = set(int(i) for i in history) - {int(target)}
        bad += sum(int(i) in seen for i in items)
    if bad:
        raise AssertionError(f"{what}: {bad} history items appear in the top-k lists: the exclusion is broken")


def peak_rss_gib() -> float:
    """Peak resident memory of this process plus its largest child (ru_maxrss is in KiB on Linux)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return kib / 1024**2


class TrainClock:
    """Accumulates training time only (validation is excluded), so the budget buys the same training for each peer."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.seconds = 0.0
        self._start: Optional[float] = None

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def elapsed(self) -> float:
        running = time.perf_counter() - self._start if self._start is not None else 0.0
        return self.seconds + running

    def spent(self) -> bool:
        return self.elapsed() >= self.budget_s


class EarlyStopper:
    """Keeps the best validation NDCG@10 and its model state; says stop after `patience` epochs without a gain."""

    def __init__(self, patience: int, snapshot: Callable[[], dict]) -> None:
        self.patience = patience
        self.snapshot = snapshot
        self.best_score = -math.inf
        self.best_epoch: Optional[int] = None
        self.best_metrics: Optional[dict] = None
        self.best_state: Optional[dict] = None
        self.bad_epochs = 0

    def update(self, epoch: int, metrics: dict) -> bool:
        """Record one validation; returns True when training should stop."""
        if metrics["ndcg@10"] > self.best_score:
            self.best_score, self.best_epoch, self.best_metrics = metrics["ndcg@10"], epoch, metrics
            self.best_state = self.snapshot()
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience


def build_parser(library: str, default_batch_size: int) -> argparse.ArgumentParser:
    """The flags both runners share."""
    parser = argparse.ArgumentParser(
        description=(
            f"Train and evaluate {library}'s SASRec under the pinfm-hf benchmark protocols (see benchmarks/peers/"
            "README.md). Run with the peer's own venv python (.venv-peers/...), never the project's."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True,
                        help="ml-1m: HSTU leave-one-out, length 200, no validation; sports: leave-last-two-out, length 50, "
                             "early stopping on valid NDCG@10")
    parser.add_argument("--data_dir", type=Path, default=REPO_ROOT.parent / "shared" / "data",
                        help="folder holding ml-1m/ and amazon-sports/ (read-only)")
    parser.add_argument("--cache_dir", type=Path, default=REPO_ROOT / ".cache" / "peers",
                        help="where converted files are written (never next to the shared data)")
    parser.add_argument("--time_budget_s", type=float, default=1800.0,
                        help="training wall-time budget in seconds (validation excluded); training stops mid-epoch "
                             "when it is spent, then the model is evaluated")
    parser.add_argument("--max_epochs", type=int, default=200,
                        help="upper bound on epochs; with a large budget this trains to convergence")
    parser.add_argument("--patience", type=int, default=10,
                        help="sports only: stop after this many epochs without a better valid NDCG@10")
    parser.add_argument("--batch_size", type=int, default=default_batch_size, help="training batch size")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--max_users", type=int, default=None,
                        help="keep only the first N users in file order (smoke tests)")
    parser.add_argument("--output", type=Path, default=None, help="JSON result file (printed either way)")
    return parser


def run_figures(epochs_completed: float, seconds: float, stopped_by: str, supervised_targets: int, test_ranks: np.ndarray,
                stopper: Optional["EarlyStopper"]) -> dict:
    """The measured part of a result, in the same units for both peers (`stopper` None: no validation split)."""
    return {
        "epochs_completed": round(epochs_completed, 4),
        "train_seconds": round(seconds, 2),
        "stopped_by": stopped_by,
        "supervised_targets": supervised_targets,
        "targets_per_s": round(supervised_targets / max(seconds, 1e-9), 1),
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "test": metrics_from_ranks(test_ranks),
        "valid": stopper.best_metrics if stopper else None,
        "best_epoch": stopper.best_epoch if stopper else None,
    }


def write_result(path: Optional[Path], result: dict) -> None:
    """Print the result and write it as JSON; keys are fixed so results of both peers line up."""
    expected = {"library", "dataset", "protocol", "config", "epochs_completed", "train_seconds", "stopped_by",
                "supervised_targets", "targets_per_s", "peak_rss_gib", "test", "valid", "best_epoch"}
    assert set(result) == expected, f"result keys differ: {set(result) ^ expected}"
    text = json.dumps(result, indent=2)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
