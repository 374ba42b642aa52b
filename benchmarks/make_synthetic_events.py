"""A seeded synthetic event log with the shape of a real one, written as Parquet shards: for scale and speed only.

    python benchmarks/make_synthetic_events.py --events 10_000_000 --items 1_000_000 --output_dir data/synthetic_1e7

- Users' history lengths follow a discrete power law (Pareto, exponent 1.94 from x_min 4.2): median 6 events, 99th
  percentile about 45, a long tail to `--max_history` (thousands), as most e-commerce logs.
- Items follow Zipf popularity (exponent `--zipf`, 1 by default); ids are scattered over the id range, so that the
  most popular items are not the smallest ids.
- Actions: view >> click > cart > save > buy (`ACTION_RATES`).
- Timestamps come in sessions: a few seconds to minutes apart within one, hours to days between two; about 2% of
  consecutive events share a second (ties, which keep file order downstream).
- Each shard holds a time range, so one user's events span shards (as in a log written day by day); within a shard,
  a few adjacent rows are swapped (out of order) and a few rows are written twice (exact duplicates).

Deterministic for a given seed and shape: the same flags write the same files. Never use it for quality claims.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


ACTION_RATES = {"view": 0.80, "click": 0.15, "cart": 0.03, "save": 0.015, "buy": 0.005}
PARETO_EXPONENT, PARETO_MIN = 1.94, 4.2  # median 6, 99th percentile ~45
DAY = 86_400
START = 1_700_000_000  # 2023-11-14


def history_lengths(rng: np.random.Generator, num_users: int, max_history: int) -> np.ndarray:
    """Power-law history lengths (at least 1, at most `max_history`)."""
    lengths = np.floor(PARETO_MIN * rng.random(num_users) ** (-1.0 / PARETO_EXPONENT))
    return np.clip(lengths, 1, max_history).astype(np.int64)


class ZipfItems:
    """Item ids with Zipf popularity over `num_items` ranks, scattered over the id range by a fixed bijection."""

    def __init__(self, num_items: int, exponent: float):
        weights = np.arange(1, num_items + 1, dtype=np.float64) ** -exponent
        self.cdf = np.cumsum(weights) / weights.sum()
        self.num_items = num_items
        # rank -> id by multiplication with a number coprime to num_items: a permutation that costs no memory.
        self.stride = next(s for s in range(int(num_items * 0.618) | 1, 2 * num_items + 3) if np.gcd(s, num_items) == 1)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        ranks = np.searchsorted(self.cdf, rng.random(n), side="right").clip(max=self.num_items - 1)
        return (ranks * self.stride + 7) % self.num_items


def user_block(rng: np.random.Generator, first_user: int, lengths: np.ndarray, items: ZipfItems, days: int) -> dict:
    """The events of consecutive users `first_user, ...`, one user after the other, each in time order."""
    n = int(lengths.sum())
    user = np.repeat(np.arange(first_user, first_user + len(lengths)), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    first_event = np.zeros(n, dtype=bool)
    first_event[starts] = True
    # Gaps: within a session a few seconds to minutes (2% ties), a new session after hours to days (15%).
    in_session = np.where(rng.random(n) < 0.02, 0, rng.exponential(90.0, n).astype(np.int64) + 1)
    new_session = rng.random(n) < 0.15
    gaps = np.where(new_session, rng.exponential(1.5 * DAY, n).astype(np.int64) + 600, in_session)
    begin = START + rng.integers(0, days * DAY, len(lengths))
    gaps[first_event] = 0
    time = np.cumsum(gaps)
    time -= np.repeat(time[starts], lengths)  # restart at each user
    timestamp = np.repeat(begin, lengths) + time
    action = rng.choice(len(ACTION_RATES), size=n, p=list(ACTION_RATES.values())).astype(np.int8)
    return {"user_id": user, "item_id": items.sample(rng, n), "action": action, "timestamp": timestamp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=float, required=True, help="About this many events (e.g. 1e6, 1e7, 1e8).")
    parser.add_argument("--items", type=float, default=None, help="Distinct item ids (default: events / 10, at most 1e7).")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--shards", type=int, default=None, help="Parquet files, one time range each (default: 1 per 1e7 events).")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of item popularity.")
    parser.add_argument("--max_history", type=int, default=5000)
    parser.add_argument("--days", type=int, default=90, help="Span of the log's start times.")
    parser.add_argument("--duplicate_rate", type=float, default=1e-4, help="Share of rows written twice.")
    parser.add_argument("--out_of_order_rate", type=float, default=1e-4, help="Share of rows swapped with the next row.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    target = int(args.events)
    num_items = int(args.items) if args.items else max(100, min(target // 10, 10**7))
    num_shards = args.shards or max(1, round(target / 10**7))
    rng = np.random.default_rng(args.seed)
    items = ZipfItems(num_items, args.zipf)
    actions = pa.array(list(ACTION_RATES))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("action", pa.string()), ("timestamp", pa.int64())])
    writers = [pq.ParquetWriter(args.output_dir / f"events-{k:05d}.parquet", schema) for k in range(num_shards)]
    span = (args.days + 30) * DAY  # start times + the time users stay active
    written, duplicates, swapped, user, block = 0, 0, 0, 0, 2_000_000
    started = time.perf_counter()
    while written < target:
        lengths = history_lengths(rng, max(1, int(block / 8.7)), args.max_history)
        lengths = lengths[: np.searchsorted(np.cumsum(lengths), target - written, side="right") + 1]
        events = user_block(rng, user, lengths, items, args.days)
        user += len(lengths)
        shard = np.clip((events["timestamp"] - START) * num_shards // span, 0, num_shards - 1)
        for k in range(num_shards):
            rows = np.flatnonzero(shard == k)
            if len(rows) == 0:
                continue
            rows = rows[np.argsort(events["timestamp"][rows], kind="stable")]  # a log: written in time order
            swap = np.flatnonzero(rng.random(len(rows) - 1) < args.out_of_order_rate)
            rows[swap], rows[swap + 1] = rows[swap + 1], rows[swap].copy()
            twice = rng.random(len(rows)) < args.duplicate_rate
            rows = np.repeat(rows, np.where(twice, 2, 1))
            swapped, duplicates = swapped + len(swap), duplicates + int(twice.sum())
            writers[k].write_table(pa.table({
                "user_id": events["user_id"][rows], "item_id": events["item_id"][rows],
                "action": actions.take(events["action"][rows]), "timestamp": events["timestamp"][rows],
            }, schema=schema), row_group_size=1 << 20)
        written += int(lengths.sum())
        print(f"\r{written:,} / {target:,} events, {user:,} users ({time.perf_counter() - started:.0f} s)", end="", flush=True)
    for writer in writers:
        writer.close()
    print()
    summary = {"events": written + duplicates, "distinct_events": written, "users": user, "items": num_items,
               "shards": num_shards, "duplicates": duplicates, "out_of_order_swaps": swapped, "seed": args.seed,
               "seconds": round(time.perf_counter() - started, 1)}
    (args.output_dir / "synthetic.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
