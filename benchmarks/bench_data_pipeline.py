"""Wall time of each stage of the ML-1M data pipeline (events -> split sequences on disk), and its peak memory.

    python benchmarks/bench_data_pipeline.py --output benchmarks/results/data_pipeline.json

Run from the repository root (the default `--data_dir ../shared/data` is relative to it). Stages, each timed on
its own and reported as the best of `--repeats` full passes (after one warm-up pass that is not counted):

- `load`: read and validate `ml-1m.inter`, joining `genre` from `ml-1m.item` (`load_movielens_atomic`);
- `build_user_sequences`: group the events into one time-ordered row per user;
- `leave_last_out_split`: the HSTU train/valid/test split;
- `save_sequences`: write the three splits to a fresh temporary folder (`save_to_disk`, atomic rename).

Peak memory comes from one extra (cold) pass in a fresh subprocess (this script's `--child` mode, started
before the timed passes so it inherits no high-water mark from them): `ru_maxrss` after `import pinfm_hf.data`
only (the baseline: Python, pyarrow, datasets, transformers, torch) and after the whole pipeline; their
difference is the pipeline's own share. `VmHWM` from /proc is reported alongside as a cross-check.
"""

import argparse
import gc
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import emit  # benchmarks/ is on sys.path when a script runs


STAGES = ("load", "build_user_sequences", "leave_last_out_split", "save_sequences")


def max_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def proc_status_mib(field: str):
    """`VmHWM` (peak) or `VmRSS` (current) of this process image from /proc (Linux only, else None)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_pipeline(data_dir: Path, out_dir: Path) -> tuple[dict, dict]:
    """One full pass; returns (seconds per stage, counts). Counts are taken after the clock stops."""
    import datasets
    import pyarrow.compute as pc

    from pinfm_hf.data import build_user_sequences, leave_last_out_split, load_movielens_atomic, save_sequences

    datasets.disable_progress_bars()  # keep stderr clean; tqdm's cost on 6,040 rows is negligible
    seconds = {}
    start = time.perf_counter()
    events = load_movielens_atomic(data_dir / "ml-1m", with_genres=True)
    seconds["load"] = time.perf_counter() - start

    start = time.perf_counter()
    sequences = build_user_sequences(events)
    seconds["build_user_sequences"] = time.perf_counter() - start

    start = time.perf_counter()
    splits = leave_last_out_split(sequences)
    seconds["leave_last_out_split"] = time.perf_counter() - start

    start = time.perf_counter()
    save_sequences(splits, out_dir / "ml-1m-sequences")
    seconds["save_sequences"] = time.perf_counter() - start

    seconds["total"] = sum(seconds[s] for s in STAGES)
    counts = {
        "events": len(events),
        "events_read": events.num_rows_read,
        "duplicates_dropped": events.num_duplicates_dropped,
        "users": len(sequences),
        "columns": list(events.table.column_names),
        "split_users": {name: len(split) for name, split in splits.items()},
        "split_events": {
            name: pc.sum(pc.list_value_length(split.with_format("arrow")[:].column("item_ids"))).as_py()
            for name, split in splits.items()
        },
    }
    return seconds, counts


def child(data_dir: Path) -> None:
    """Peak-memory mode: one pass in this fresh process, JSON on stdout."""
    import pinfm_hf.data  # noqa: F401  (the baseline: everything the pipeline imports, torch included)

    baseline = max_rss_mib()
    baseline_hwm = proc_status_mib("VmHWM")
    with tempfile.TemporaryDirectory(prefix="bench_data_pipeline_") as tmp:
        seconds, counts = run_pipeline(data_dir, Path(tmp))
    peak = max_rss_mib()
    peak_hwm = proc_status_mib("VmHWM")
    rounded = lambda x: None if x is None else round(x, 1)  # noqa: E731
    print(json.dumps({
        "baseline_after_import_mib": rounded(baseline),
        "peak_mib": rounded(peak),
        "pipeline_share_mib": rounded(peak - baseline),
        "vmhwm_baseline_mib": rounded(baseline_hwm),
        "vmhwm_peak_mib": rounded(peak_hwm),
        "cold_pass_seconds": {k: round(v, 3) for k, v in seconds.items()},
        "events": counts["events"],
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=Path("../shared/data"), help="Folder holding ml-1m/.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_memory", action="store_true", help="Do not run the peak-memory subprocess.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    random.seed(0)  # the pipeline is deterministic; seeded anyway so any future sampling is too
    if args.child:
        child(args.data_dir)
        return
    if not (args.data_dir / "ml-1m").is_dir():
        parser.error(f"{args.data_dir / 'ml-1m'} not found: run from the repository root or pass --data_dir.")

    # The memory child runs first, while this process is still small: Linux carries a process's ru_maxrss
    # across fork + exec, so a child started after the timed passes would report this process's peak as its own.
    memory = None
    if not args.skip_memory:
        result = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", "--data_dir", str(args.data_dir)],
            check=True, capture_output=True, text=True,
        )
        memory = json.loads(result.stdout.strip().splitlines()[-1])
        memory["parent_rss_at_spawn_mib"] = round(max_rss_mib(), 1)

    import numpy as np
    import pyarrow as pa
    import datasets
    import torch

    np.random.seed(0)
    timings = {name: [] for name in (*STAGES, "total")}
    with tempfile.TemporaryDirectory(prefix="bench_data_pipeline_") as tmp:
        for i in range(args.repeats + 1):  # pass 0 warms up (page cache, lazy imports, kernel registries)
            out_dir = Path(tmp) / f"pass_{i}"  # a fresh folder each pass: save never overwrites
            gc.collect()
            seconds, counts = run_pipeline(args.data_dir, out_dir)
            if i > 0:
                for name, value in seconds.items():
                    timings[name].append(value)

    stages = {
        name: {
            "best_s": round(min(values), 4),
            "median_s": round(sorted(values)[len(values) // 2], 4),
        }
        for name, values in timings.items()
    }
    best_total = min(timings["total"])
    stages["total"]["events_per_s"] = round(counts["events"] / best_total)

    report = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "arrow_cpu_count": pa.cpu_count(),
        "os_cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyarrow": pa.__version__,
        "datasets": datasets.__version__,
        "data": str(args.data_dir / "ml-1m" / "ml-1m.inter"),
        "repeats": args.repeats,
        "events_read": counts["events_read"],
        "duplicates_dropped": counts["duplicates_dropped"],
        "events": counts["events"],
        "users": counts["users"],
        "event_columns": counts["columns"],
        "split_users": counts["split_users"],
        "split_events": counts["split_events"],
        "stages": stages,
        "sum_of_best_stages_s": round(sum(min(timings[s]) for s in STAGES), 4),
        "peak_memory": memory,
    }
    emit(report, args.output)


if __name__ == "__main__":
    main()
