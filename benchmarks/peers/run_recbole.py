"""RecBole 1.2.1 SASRec under the pinfm-hf benchmark protocols (ML-1M HSTU leave-one-out, Sports leave-last-two-out).

Run with the RecBole venv: .venv-peers/recbole/bin/python benchmarks/peers/run_recbole.py --dataset ml-1m ...
RecBole does the data split, the prefix augmentation and the model; this script only drives the training loop (so a
time budget can stop it mid-epoch) and ranks the scores of `full_sort_predict` itself, because RecBole's full-sort
evaluation does not exclude the input history for sequential models (RecBole issue #1823).
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.model.sequential_recommender import SASRec  # noqa: E402
from recbole.utils import init_seed  # noqa: E402

# Importing recbole.model.sequential_recommender runs `torch.autograd.set_detect_anomaly(True)` at module level
# (in sine.py), for every sequential model: a debugging mode that checks each backward output for NaN and made
# SASRec's training step 1.6-2x slower here. It changes no result, so it is switched off unless asked for.
RECBOLE_IMPORT_ANOMALY_MODE = torch.is_anomaly_enabled()


def write_atomic_file(sequences: dict[int, np.ndarray], path: Path) -> None:
    """RecBole .inter file whose timestamp is each event's position in its user's sequence.

    Unique per-user keys make RecBole's (not necessarily stable) time sorts reproduce the protocol's order, in which
    ties in time keep file order.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for user, seq in sequences.items():
            f.writelines(f"{user}\t{item}\t{pos}\n" for pos, item in enumerate(seq))
    tmp.replace(path)


def recbole_config(args, name: str, spec: C.DatasetSpec) -> Config:
    """SASRec settings shared with the RecTools runner, written in RecBole's names."""
    config_dict = {
        "data_path": str(args.cache_dir / "recbole"),
        "checkpoint_dir": str(args.cache_dir / "recbole" / "saved"),
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
        "MAX_ITEM_LIST_LENGTH": spec.max_len,
        "eval_args": {"split": {"LS": "valid_and_test" if spec.has_valid else "test_only"},
                      "order": "TO", "group_by": "user", "mode": "full"},
        "train_neg_sample_args": None, "loss_type": "CE",
        "hidden_size": 64, "inner_size": 64, "n_layers": 2, "n_heads": 2, "hidden_act": "relu",
        "hidden_dropout_prob": spec.dropout, "attn_dropout_prob": spec.dropout,
        "learning_rate": 1e-3, "train_batch_size": args.batch_size, "eval_batch_size": 1024,
        "epochs": args.max_epochs, "seed": args.seed, "reproducibility": True,
        "use_gpu": False, "worker": 0, "show_progress": False, "state": "WARNING",
    }
    argv, sys.argv = sys.argv, sys.argv[:1]  # RecBole's Config also parses `--key=value` from the command line
    try:
        return Config(model="SASRec", dataset=name, config_dict=config_dict)
    finally:
        sys.argv = argv


def verify_split(dataset, model: SASRec, cases: list[C.EvalCase], internal2code: np.ndarray, what: str) -> None:
    """Fail unless RecBole's evaluation rows are exactly the protocol's (user, last max_len inputs, target)."""
    inter = dataset.inter_feat
    users = dataset.id2token(dataset.uid_field, inter[dataset.uid_field].numpy())
    seqs, lens = inter[model.ITEM_SEQ].numpy(), inter[model.ITEM_SEQ_LEN].numpy()
    targets = internal2code[inter[model.POS_ITEM_ID].numpy()]
    expected = {case.user: case for case in cases}
    assert len(users) == len(expected), f"{what}: RecBole has {len(users)} rows, the protocol {len(expected)}"
    for user, seq, length, target in zip(users, seqs, lens, targets):
        case = expected[int(user)]
        assert target == case.target and np.array_equal(internal2code[seq[:length]], case.history), (
            f"{what}: RecBole's input/target for user {user} differ from the protocol's")


@torch.no_grad()
def rank_split(model: SASRec, loader, topk: int = 200) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray]:
    """1-based rank of each target over all items, the model's input items excluded (the target never is).

    Ties count in the target's favour (rank = 1 + #items scored higher), as pinfm-hf's `rank_of_targets` does.
    Returns ranks, top-k internal item ids, and the users' internal ids and targets in the same row order.
    """
    model.eval()
    ranks, tops, users, targets = [], [], [], []
    for batch in loader:
        interaction = batch[0]
        scores = model.full_sort_predict(interaction)  # (B, n_items); column 0 is RecBole's padding
        seq, target = interaction[model.ITEM_SEQ], interaction[model.POS_ITEM_ID]
        target_score = scores.gather(1, target[:, None])
        scores.scatter_(1, seq, float("-inf"))  # the padding id 0 is in every padded row; masked below anyway
        scores[:, 0] = float("-inf")
        scores.scatter_(1, target[:, None], target_score)  # the target stays rankable even if it is in the input
        ranks.append((1 + (scores > target_score).sum(1)).numpy())
        tops.extend(scores.topk(min(topk, scores.shape[1]), dim=1).indices.numpy())
        users.append(interaction[model.USER_ID].numpy())
        targets.append(target.numpy())
    model.train()
    return np.concatenate(ranks), tops, np.concatenate(users), np.concatenate(targets)


def main(argv: Optional[list[str]] = None) -> None:
    parser = C.build_parser("RecBole 1.2.1", default_batch_size=256)
    parser.add_argument("--keep_anomaly_detection", action="store_true",
                        help="keep the autograd anomaly detection that importing RecBole's sequential models switches "
                             "on (RecBole's out-of-the-box speed); off by default, results are the same")
    args = parser.parse_args(argv)
    torch.autograd.set_detect_anomaly(args.keep_anomaly_detection)
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.WARNING)
    spec = C.DATASETS[args.dataset]

    sequences, num_items = C.load_sequences(args.dataset, args.data_dir, args.max_users)
    split = C.split_protocol(sequences, args.dataset, num_items)
    name = f"{args.dataset}_{'all' if args.max_users is None else f'u{args.max_users}'}"
    write_atomic_file(sequences, args.cache_dir / "recbole" / name / f"{name}.inter")

    config = recbole_config(args, name, spec)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = SASRec(config, train_data.dataset)
    torch.set_num_threads(args.threads)  # init_seed may touch torch settings; keep the requested threads

    iid = dataset.iid_field
    internal2code = np.array([0] + [int(t) for t in dataset.field2id_token[iid][1:]])
    code2internal = np.zeros(num_items + 1, dtype=np.int64)
    code2internal[internal2code[1:]] = np.arange(1, len(internal2code))
    verify_split(test_data.dataset, model, split.test, internal2code, "test")
    if spec.has_valid:
        verify_split(valid_data.dataset, model, split.valid, internal2code, "valid")

    optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])  # RecBole's learner 'adam'
    clock = C.TrainClock(args.time_budget_s)
    stopper = C.EarlyStopper(args.patience, lambda: {k: v.clone() for k, v in model.state_dict().items()})
    batches_per_epoch = len(train_data)
    supervised, epochs_completed, stopped_by = 0, 0.0, "max_epochs"
    t0 = time.time()
    for epoch in range(1, args.max_epochs + 1):
        model.train()
        clock.start()
        done = 0
        for interaction in train_data:
            optimizer.zero_grad()
            loss = model.calculate_loss(interaction)
            loss.backward()
            optimizer.step()
            supervised += len(interaction)  # one target per prefix example
            done += 1
            if clock.spent():
                break
        clock.stop()
        epochs_completed = epoch - 1 + done / batches_per_epoch
        if spec.has_valid:
            valid_metrics = C.metrics_from_ranks(rank_split(model, valid_data)[0])
            print(f"[recbole] epoch {epoch} ({clock.seconds:.0f}s train) loss {loss.item():.4f} valid {valid_metrics}",
                  flush=True)
            if stopper.update(epoch, valid_metrics):
                stopped_by = "early_stopping"
                break
        else:
            print(f"[recbole] epoch {epoch} ({clock.seconds:.0f}s train) loss {loss.item():.4f}", flush=True)
        if clock.spent():
            stopped_by = "time_budget"
            break
    if spec.has_valid:
        model.load_state_dict(stopper.best_state)

    ranks, tops, users, targets = rank_split(model, test_data)
    by_user = {case.user: case for case in split.test}
    cases = [by_user[int(u)] for u in dataset.id2token(dataset.uid_field, users)]
    C.check_history_excluded(tops, [code2internal[c.history] for c in cases], targets, "recbole test")
    result = {
        "library": f"recbole {importlib.metadata.version('recbole')}",
        "dataset": args.dataset,
        "protocol": spec.protocol,
        "config": {
            "model": "SASRec", "hidden_size": 64, "inner_size": 64, "n_layers": 2, "n_heads": 2, "hidden_act": "relu",
            "hidden_dropout_prob": spec.dropout, "attn_dropout_prob": spec.dropout,
            "MAX_ITEM_LIST_LENGTH": spec.max_len, "loss_type": "CE (full softmax over all items)",
            "optimizer": "Adam(lr=1e-3, betas=(0.9, 0.999))", "train_batch_size": args.batch_size,
            "training_examples": "every prefix of every training sequence, one target each",
            "train_examples_per_epoch": len(train_data.dataset), "num_items": num_items,
            "max_epochs": args.max_epochs, "time_budget_s": args.time_budget_s,
            "patience": args.patience if spec.has_valid else None, "seed": args.seed, "threads": args.threads,
            "max_users": args.max_users, "torch": torch.__version__,
            "autograd_anomaly_detection": torch.is_anomaly_enabled(),
            "recbole_import_enabled_anomaly_detection": RECBOLE_IMPORT_ANOMALY_MODE,
        },
        **C.run_figures(epochs_completed, clock.seconds, stopped_by, supervised, ranks, stopper if spec.has_valid else None),
    }
    print(f"[recbole] total wall {time.time() - t0:.0f}s (training + validation + test)", flush=True)
    C.write_result(args.output, result)


if __name__ == "__main__":
    main()
