"""Scale: preparing synthetic event logs of 10^6..10^8 events out of core, with DuckDB and with Spark.

    python benchmarks/bench_scale.py --sizes 1e6 1e7 1e8 --spark_sizes 1e7 --output benchmarks/results/scale.json

For each size, `benchmarks/make_synthetic_events.py` writes the log once (Parquet shards, 10 events per item, seeded;
reused when present), then `recipes/prepare_events.py` prepares it in a fresh process whose peak RSS (the whole
process: Python, Arrow and DuckDB) and wall time are recorded. DuckDB runs with `--memory_limit` (3 GB by default) and
every core; Spark in `local[*]` mode (its time only: its memory is a JVM's, sized by Spark's own settings).
Writes `prepare` (rows of `size`, `engine`, `events`, `peak_rss_gib`, `seconds`, ...) and `prepare_seconds_ratio_1e8_vs_1e7`.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _report import emit


ROOT = Path(__file__).resolve().parents[1]
# Runs the recipe in this process and reports its peak RSS: the figure covers DuckDB's memory too (it is in-process).
MEASURED = """
import json, resource, runpy, sys, time
sys.argv = [sys.argv[1], *sys.argv[2:]]
start = time.perf_counter()
runpy.run_path(sys.argv[0], run_name="__main__")
print("MEASURED " + json.dumps({"seconds": time.perf_counter() - start,
                                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def synthetic_log(runs_dir: Path, events: int) -> Path:
    folder = runs_dir / f"synthetic_{events:.0e}".replace("+", "")
    if not (folder / "synthetic.json").exists():
        command = [sys.executable, str(ROOT / "benchmarks" / "make_synthetic_events.py"), "--events", str(events),
                   "--output_dir", str(folder)]
        print("$", " ".join(command), file=sys.stderr, flush=True)
        subprocess.run(command, check=True)
    return folder


def prepare(log: Path, output_dir: Path, engine: str, memory_limit: str) -> dict:
    command = [sys.executable, "-c", MEASURED, str(ROOT / "recipes" / "prepare_events.py"), "--events",
               str(log / "*.parquet"), "--output_dir", str(output_dir), "--engine", engine, "--memory_limit", memory_limit]
    print("$", " ".join(command[3:]), file=sys.stderr, flush=True)
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    measured = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("MEASURED "))[9:])
    prepared = json.loads((output_dir / "prepared.json").read_text())
    return {"engine": engine, "events": prepared["events_read"], "users": prepared["users"], "items": prepared["items"],
            "duplicates_dropped": prepared["duplicates_dropped"], "peak_rss_gib": round(measured["peak_rss_gib"], 3),
            "seconds": round(measured["seconds"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8], help="Events per synthetic log.")
    parser.add_argument("--spark_sizes", type=float, nargs="*", default=[1e7], help="Sizes also prepared on Spark.")
    parser.add_argument("--memory_limit", default="3GB", help="DuckDB's --memory_limit.")
    parser.add_argument("--runs_dir", type=Path, default=ROOT / "benchmarks" / "runs" / "scale")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    started = time.perf_counter()
    rows = []
    for size in map(int, args.sizes):
        log = synthetic_log(args.runs_dir, size)
        for engine in ["duckdb"] + (["spark"] if size in map(int, args.spark_sizes) else []):
            row = prepare(log, args.runs_dir / f"prepared_{engine}_{size:.0e}".replace("+", ""), engine, args.memory_limit)
            rows.append({"size": size, **row})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    seconds = {row["size"]: row["seconds"] for row in rows if row["engine"] == "duckdb"}
    report = {
        "memory_limit": args.memory_limit,
        "prepare": rows,
        "prepare_seconds_ratio_1e8_vs_1e7": round(seconds[10**8] / seconds[10**7], 2) if {10**7, 10**8} <= set(seconds) else None,
        "seconds": round(time.perf_counter() - started, 1),
    }
    emit(report, args.output)


if __name__ == "__main__":
    main()
