"""PinFMTokenizer encode throughput (events/s) on ML-1M's per-user sequences, three ways, plus the vocabulary build.

    python benchmarks/bench_tokenizer.py --output benchmarks/results/tokenizer.json

Run from the repository root (the default `--data_dir ../shared/data` is relative to it). Every user (6,040,
1,000,209 events in) is encoded with `max_length` 200, i.e. each user's 200 most recent events (661,028 events out):

- `encode_sequences`: the vectorised Arrow path, on the whole `datasets.Dataset` in one call (item ids, actions,
  timestamps); its time includes the Dataset -> Arrow view.
- `encode_events`: one call per user in a Python loop (item ids, actions, timestamps as Python lists).
- `hf_call`: the standard per-token Hugging Face path, `tokenizer(item_ids, is_split_into_words=True,
  truncation=True, max_length=200)` per user (item ids only, so it does less work than the other two).

The two per-user paths are slow, so they run on a seeded random sample of `--slow_users` users (materialised as
Python lists beforehand, outside the clock, which favours them) and their rate is scaled to the whole data set by
events encoded. All three run interleaved in each repeat, best of `--repeats` after a warm-up (one timing averages
as many calls as fill `--min_time`, like `timeit`), and the ratios (vectorised / per-user loop, vectorised / HF
call) come from the same run, so they hold up on a noisy machine.
Before timing, the three outputs are checked to agree on the sampled users. `PinFMTokenizer.from_events` (vocabulary
build from the event table, 3,706 items + 1,024 hash buckets) is timed in the same loop.
"""

import argparse
import gc
import platform
import random
import time
from pathlib import Path

import numpy as np

from _report import emit  # benchmarks/ is on sys.path when a script runs


def time_interleaved(methods: dict, *, repeats: int, min_time: float) -> tuple[dict[str, list[float]], dict[str, int]]:
    """
    Seconds per call of each method, interleaved in every repeat after a warm-up. The warm-up call also sets how many
    calls one timing averages over (>= `min_time` s), as `timeit` does: a single 40 ms call is too short to time on a
    busy machine. Returns `(timings, calls)`.
    """
    calls = {}
    for name, fn in methods.items():
        start = time.perf_counter()
        fn()
        calls[name] = max(1, int(np.ceil(min_time / max(time.perf_counter() - start, 1e-6))))
    timings = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            gc.collect()
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            timings[name].append((time.perf_counter() - start) / calls[name])
    return timings, calls


def paths_agree(vectorised, per_user: list, hf: list, subset_rows, users: int, events_out: int) -> bool:
    """The vectorised table encodes every user and event it should, and the per-user paths give its ids on the sample."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if vectorised.num_rows != users or pc.sum(pc.list_value_length(vectorised.column("input_ids"))).as_py() != events_out:
        return False
    expected_ids = vectorised.column("input_ids").take(pa.array(subset_rows)).to_pylist()
    expected_actions = vectorised.column("action_ids").take(pa.array(subset_rows)).to_pylist()
    return (
        [e["input_ids"] for e in per_user] == expected_ids
        and [e["action_ids"] for e in per_user] == expected_actions
        and [e["input_ids"] for e in hf] == expected_ids
    )


def rate_row(timings: list[float], calls: int, users: int, n_in: int, n_out: int, events_out: int) -> dict:
    """One method's figures: best and median seconds, events encoded per second, the whole data set's estimate."""
    best = min(timings)
    median = sorted(timings)[len(timings) // 2]
    rate = n_out / best
    return {
        "users_timed": users,
        "calls_per_timing": calls,
        "events_in_timed": n_in,
        "events_encoded_timed": n_out,
        "best_s": round(best, 4),
        "median_s": round(median, 4),
        "events_encoded_per_s": round(rate),
        "median_events_encoded_per_s": round(n_out / median),
        "events_in_per_s": round(n_in / best),
        "est_all_users_s": round(events_out / rate, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=Path("../shared/data"), help="Folder holding ml-1m/.")
    parser.add_argument("--max_length", type=int, default=200)
    parser.add_argument("--num_hash_buckets", type=int, default=1024)
    parser.add_argument("--slow_users", type=int, default=1000, help="Users sampled for the per-user paths.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min_time", type=float, default=0.25, help="Seconds one timing spans at least.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if not (args.data_dir / "ml-1m").is_dir():
        parser.error(f"{args.data_dir / 'ml-1m'} not found: run from the repository root or pass --data_dir.")

    import pyarrow as pa
    import pyarrow.compute as pc
    import torch
    import transformers

    from pinfm_hf import PinFMTokenizer
    from pinfm_hf.data import build_user_sequences, load_movielens_atomic

    random.seed(args.seed)
    np.random.seed(args.seed)
    transformers.logging.set_verbosity_error()

    # ----- set-up (not timed) -----
    events = load_movielens_atomic(args.data_dir / "ml-1m", with_genres=False)
    sequences = build_user_sequences(events)
    lengths = pc.list_value_length(sequences.with_format("arrow")[:].column("item_ids")).to_numpy()
    events_in = int(lengths.sum())
    events_out = int(np.minimum(lengths, args.max_length).sum())
    tokenizer = PinFMTokenizer.from_events(events, num_hash_buckets=args.num_hash_buckets, model_max_length=args.max_length)

    rng = np.random.default_rng(args.seed)
    n_slow = min(args.slow_users, len(sequences))
    subset_rows = np.sort(rng.choice(len(sequences), size=n_slow, replace=False))
    subset = sequences.select(subset_rows).with_format("arrow")[:]
    sub_items = subset.column("item_ids").to_pylist()
    sub_actions = subset.column("actions").to_pylist()
    sub_timestamps = subset.column("timestamps").to_pylist()
    sub_lengths = lengths[subset_rows]
    sub_in = int(sub_lengths.sum())
    sub_out = int(np.minimum(sub_lengths, args.max_length).sum())

    def run_vectorised():
        return tokenizer.encode_sequences(sequences, max_length=args.max_length)

    def run_encode_events(n=n_slow):
        return [
            tokenizer.encode_events(sub_items[i], actions=sub_actions[i], timestamps=sub_timestamps[i], max_length=args.max_length)
            for i in range(n)
        ]

    def run_hf_call(n=n_slow):
        return [
            tokenizer(sub_items[i], is_split_into_words=True, truncation=True, max_length=args.max_length)
            for i in range(n)
        ]

    def run_from_events():
        return PinFMTokenizer.from_events(events, num_hash_buckets=args.num_hash_buckets, model_max_length=args.max_length)

    # ----- correctness: the three paths must agree on the sampled users -----
    outputs_match = paths_agree(run_vectorised(), run_encode_events(), run_hf_call(), subset_rows, len(sequences), events_out)
    if not outputs_match:
        raise SystemExit("The three encode paths disagree on the sampled users: the comparison would be meaningless.")

    # ----- timing: warm-up, then the methods interleaved in every repeat -----
    methods = {
        "encode_sequences": run_vectorised,
        "encode_events": run_encode_events,
        "hf_call": run_hf_call,
        "from_events": run_from_events,
    }
    timings, calls = time_interleaved(methods, repeats=args.repeats, min_time=args.min_time)

    def encode_row(name: str, users: int, n_in: int, n_out: int) -> dict:
        return rate_row(timings[name], calls[name], users, n_in, n_out, events_out)

    rows = {
        "encode_sequences (vectorised, whole dataset)": encode_row("encode_sequences", len(sequences), events_in, events_out),
        "encode_events (per-user Python loop)": encode_row("encode_events", n_slow, sub_in, sub_out),
        "__call__ is_split_into_words (per-user HF, item ids only)": encode_row("hf_call", n_slow, sub_in, sub_out),
    }
    vec, loop, call = (r["events_encoded_per_s"] for r in rows.values())
    report = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "arrow_cpu_count": pa.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "transformers": transformers.__version__,
        "pyarrow": pa.__version__,
        "seed": args.seed,
        "repeats": args.repeats,
        "max_length": args.max_length,
        "users": len(sequences),
        "events_in": events_in,
        "events_encoded": events_out,
        "vocab_size": tokenizer.vocab_size,
        "num_items": tokenizer.num_items,
        "num_hash_buckets": args.num_hash_buckets,
        "outputs_match": outputs_match,
        "methods": rows,
        "from_events": {
            "events": len(events),
            "calls_per_timing": calls["from_events"],
            "best_s": round(min(timings["from_events"]), 4),
            "median_s": round(sorted(timings["from_events"])[len(timings["from_events"]) // 2], 4),
        },
        "vectorised_over_per_user_loop": round(vec / loop, 1),
        "vectorised_over_hf_call": round(vec / call, 1),
        "per_user_loop_over_hf_call": round(loop / call, 1),
    }
    emit(report, args.output)


if __name__ == "__main__":
    main()
