"""RecTools 0.19 SASRec under the pinfm-hf benchmark protocols (ML-1M HSTU leave-one-out, Sports leave-last-two-out).

Run with the RecTools venv: .venv-peers/rectools/bin/python benchmarks/peers/run_rectools.py --dataset ml-1m ...
RecTools trains with its own Lightning loop, one epoch per `fit_partial` call (so this script can validate between
epochs); a callback counts the supervised targets and stops mid-epoch when the time budget is spent. Ranking uses
`recommend` on a data set holding exactly each user's protocol input, so the model's context is the protocol's.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from pytorch_lightning import Callback, Trainer, seed_everything  # noqa: E402
from rectools import Columns  # noqa: E402
from rectools.dataset import Dataset  # noqa: E402
from rectools.models import SASRecModel  # noqa: E402
from rectools.models.nn.item_net import IdEmbeddingsItemNet  # noqa: E402


class BudgetCallback(Callback):
    """Counts supervised targets and batches, and stops training (mid-epoch too) once the time budget is spent."""

    def __init__(self, clock: C.TrainClock) -> None:
        self.clock = clock
        self.targets = 0
        self.batches = 0
        self.batches_per_epoch = 0
        self.budget_hit = False

    def __deepcopy__(self, memo: dict) -> "BudgetCallback":
        return self  # RecTools deep-copies the trainer on the first fit: keep one shared counter

    def on_train_epoch_start(self, trainer: Trainer, pl_module) -> None:
        self.batches_per_epoch = trainer.num_training_batches

    def on_train_batch_end(self, trainer: Trainer, pl_module, outputs, batch: dict, batch_idx: int) -> None:
        self.targets += int(((batch["y"] != 0) & (batch["yw"] != 0)).sum())  # positions the softmax loss supervises
        self.batches += 1
        if self.clock.spent():
            self.budget_hit = True
            trainer.should_stop = True


def to_dataset(sequences: dict[int, np.ndarray]) -> Dataset:
    """A RecTools data set whose datetimes are each event's position, so every sort keeps the protocol's order."""
    lengths = np.array([len(s) for s in sequences.values()])
    frame = pd.DataFrame({
        Columns.User: np.repeat(np.fromiter(sequences.keys(), dtype=np.int64), lengths),
        Columns.Item: np.concatenate(list(sequences.values())),
        Columns.Weight: 1.0,
        Columns.Datetime: pd.to_datetime(np.concatenate([np.arange(n) for n in lengths]), unit="s"),
    })
    return Dataset.construct(frame)


def rank_cases(model: SASRecModel, cases: list[C.EvalCase], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """1-based rank of each target (np.inf beyond 200 or unrankable) with the input items excluded, and the top 200.

    `recommend(filter_viewed=True)` would drop the target too when it is in the input; so ask for max_len extra
    items unfiltered and drop the input items except the target here (never more than max_len are dropped).
    """
    context = to_dataset({c.user: c.history for c in cases})
    users = np.array([c.user for c in cases])
    k = 200 + max_len
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "N target users were considered cold": they count as misses below
        reco = model.recommend(users=users, dataset=context, k=k, filter_viewed=False, on_unsupported_targets="warn")
    reco = reco.sort_values([Columns.User, Columns.Rank], kind="stable")
    row_of_user = {u: i for i, u in enumerate(users)}
    top = np.full((len(cases), k), -1, dtype=np.int64)
    rows = reco[Columns.User].map(row_of_user).to_numpy()
    top[rows, reco[Columns.Rank].to_numpy() - 1] = reco[Columns.Item].to_numpy()

    stride = int(max(top.max(), max(c.history.max() for c in cases))) + 2
    targets = np.array([c.target for c in cases])
    seen = np.concatenate([i * stride + np.setdiff1d(c.history, [c.target]) for i, c in enumerate(cases)])
    drop = np.isin(np.arange(len(cases))[:, None] * stride + top, seen)
    kept = np.take_along_axis(top, np.argsort(drop, axis=1, kind="stable"), axis=1)[:, :200]  # order kept
    hit = kept == targets[:, None]
    ranks = np.where(hit.any(1), hit.argmax(1) + 1.0, np.inf)
    return ranks, kept


def check_filter_viewed(model: SASRecModel, cases: list[C.EvalCase], kept: np.ndarray, n: int = 100) -> None:
    """Fail unless RecTools' own `filter_viewed=True` gives our top 10, i.e. it filters exactly the context's items."""
    sample = [i for i, c in enumerate(cases) if c.target not in set(c.history.tolist())][:n]
    cases_s = [cases[i] for i in sample]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reco = model.recommend(users=[c.user for c in cases_s], dataset=to_dataset({c.user: c.history for c in cases_s}),
                               k=10, filter_viewed=True, on_unsupported_targets="warn")
    theirs = reco.sort_values([Columns.User, Columns.Rank]).groupby(Columns.User)[Columns.Item].agg(list)
    for i, c in zip(sample, cases_s):
        ours = [int(x) for x in kept[i, :10] if x >= 0]
        if c.user in theirs.index and theirs[c.user] != ours:
            raise AssertionError(f"filter_viewed=True disagrees with our exclusion for user {c.user}")


def main(argv: Optional[list[str]] = None) -> None:
    args = C.build_parser("RecTools 0.19", default_batch_size=128).parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for noise in (".*does not have many workers.*", ".*no `val_dataloader`.*", ".*LeafSpec.*is deprecated.*",
                  ".*Pydantic serializer warnings.*"):  # library chatter repeated at every fit_partial call
        warnings.filterwarnings("ignore", message=noise)
    warnings.filterwarnings("ignore", category=FutureWarning)
    spec = C.DATASETS[args.dataset]
    seed_everything(args.seed, workers=True, verbose=False)

    sequences, num_items = C.load_sequences(args.dataset, args.data_dir, args.max_users)
    split = C.split_protocol(sequences, args.dataset, num_items)
    train = to_dataset(split.train)

    clock = C.TrainClock(args.time_budget_s)
    budget = BudgetCallback(clock)
    model = SASRecModel(
        n_blocks=2, n_heads=2, n_factors=64, dropout_rate=spec.dropout, session_max_len=spec.max_len,
        loss="softmax", lr=1e-3, batch_size=args.batch_size, epochs=args.max_epochs,
        item_net_block_types=(IdEmbeddingsItemNet,), recommend_torch_device="cpu", verbose=0,
        get_trainer_func=lambda: Trainer(
            max_epochs=args.max_epochs, accelerator="cpu", devices=1, callbacks=[budget], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False),
    )
    stopper = C.EarlyStopper(
        args.patience, lambda: {k: v.clone() for k, v in model.lightning_model.torch_model.state_dict().items()})
    stopped_by, t0 = "max_epochs", time.time()
    if not spec.has_valid:  # no validation: one fit call, as RecTools is normally used
        clock.start()
        model.fit_partial(train, min_epochs=0, max_epochs=args.max_epochs)
        clock.stop()
        stopped_by = "time_budget" if budget.budget_hit else "max_epochs"
    for epoch in range(1, args.max_epochs + 1 if spec.has_valid else 1):  # one epoch per call, validated after each
        clock.start()
        model.fit_partial(train, min_epochs=0, max_epochs=1)
        clock.stop()
        valid_metrics = C.metrics_from_ranks(rank_cases(model, split.valid, spec.max_len)[0])
        print(f"[rectools] epoch {epoch} ({clock.seconds:.0f}s train) valid {valid_metrics}", flush=True)
        if stopper.update(epoch, valid_metrics):
            stopped_by = "early_stopping"
            break
        if budget.budget_hit or clock.spent():
            stopped_by = "time_budget"
            break
    if spec.has_valid:
        model.lightning_model.torch_model.load_state_dict(stopper.best_state)

    ranks, kept = rank_cases(model, split.test, spec.max_len)
    targets = np.array([c.target for c in split.test])
    C.check_history_excluded(kept, [c.history for c in split.test], targets, "rectools test")
    check_filter_viewed(model, split.test, kept)
    known = set(model.data_preparator.item_id_map.external_ids.tolist())
    unknown = int(sum(t not in known for t in targets))
    print(f"[rectools] {unknown} of {len(targets)} test targets never occur in training (unrankable, count as misses)")
    result = {
        "library": f"rectools {importlib.metadata.version('rectools')}",
        "dataset": args.dataset,
        "protocol": spec.protocol,
        "config": {
            "model": "SASRecModel", "n_factors": 64, "n_blocks": 2, "n_heads": 2, "dropout_rate": spec.dropout,
            "session_max_len": spec.max_len, "loss": "softmax (full softmax over all items)",
            "optimizer": "Adam(lr=1e-3, betas=(0.9, 0.98)) (RecTools' fixed betas)", "batch_size": args.batch_size,
            "training_examples": "one window per user: the last session_max_len+1 training events, every position "
                                 "supervised",
            "item_net_block_types": ["IdEmbeddingsItemNet"], "use_pos_emb": True, "use_causal_attn": True,
            "num_items": num_items, "items_known_to_model": len(known) - 1, "test_targets_unknown_to_model": unknown,
            "max_epochs": args.max_epochs, "time_budget_s": args.time_budget_s,
            "patience": args.patience if spec.has_valid else None, "seed": args.seed, "threads": args.threads,
            "max_users": args.max_users, "torch": torch.__version__,
            "pytorch_lightning": importlib.metadata.version("pytorch-lightning"),
        },
        **C.run_figures(budget.batches / max(budget.batches_per_epoch, 1), clock.seconds, stopped_by, budget.targets, ranks, stopper if spec.has_valid else None),
    }
    print(f"[rectools] total wall {time.time() - t0:.0f}s (training + validation + test)", flush=True)
    C.write_result(args.output, result)


if __name__ == "__main__":
    main()
