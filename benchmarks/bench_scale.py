"""Scale: preparing synthetic event logs of 10^6..10^8 events out of core (DuckDB, Spark), then pretraining from them.

    python benchmarks/bench_scale.py --sizes 1e6 1e7 1e8 --spark_sizes 1e7 --stream_sizes 1e6 1e8 \
        --output benchmarks/results/scale.json

For each size, `benchmarks/make_synthetic_events.py` writes the log once (Parquet shards, 10 events per item, seeded;
reused when present), then `recipes/prepare_events.py` prepares it in a fresh process whose peak RSS (the whole
process: Python, Arrow and DuckDB) and wall time are recorded. DuckDB runs with `--memory_limit` (3 GB by default) and
every core; Spark in `local[*]` mode (its time only: its memory is a JVM's, sized by Spark's own settings).
Writes `prepare` (rows of `size`, `engine`, `events`, `peak_rss_gib`, `seconds`, ...) and `prepare_seconds_ratio_1e8_vs_1e7`.

Then, for each of `--stream_sizes`, `recipes/pretrain.py --prepared` trains `--stream_steps` steps of the generic
`pinfm_small` config with 1,024 sampled negatives (the vocabulary capped at `--max_vocab_size` items plus hash buckets,
so the model and the loss are the same at every size) from the DuckDB preparation, streamed (encoded shards read
through a shuffle buffer); on the smallest size the same run reads the event file in memory (`--dataset`), for
`stream.tokens_per_s_ratio` (streamed / in memory); `stream.peak_rss_gib` per size (the whole training process), and
`stream.rows`: `size`, `events`, `peak_rss_gib`, `tokens_per_s`, `prepare_for_training_seconds` (encoding, tokenizer
and evaluation: everything but training).

With `--sizes` empty nothing is prepared or measured again: the stream runs use the prepared folders under
`--runs_dir`, and the report keeps the `prepare` rows of the `--output` file it replaces (their date is in RESULTS.md).
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


def prepare(log: Path, output_dir: Path, engine: str, memory_limit: str, rerun: bool) -> dict:
    """Prepare `log` in a fresh process and measure it (a measured preparation is reused unless `rerun`)."""
    measured_path = output_dir / "measured.json"
    if measured_path.exists() and not rerun:
        return json.loads(measured_path.read_text())
    command = [sys.executable, "-c", MEASURED, str(ROOT / "recipes" / "prepare_events.py"), "--events",
               str(log / "*.parquet"), "--output_dir", str(output_dir), "--engine", engine, "--memory_limit", memory_limit]
    print("$", " ".join(command[3:]), file=sys.stderr, flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{command[3:]} failed:\n{result.stderr[-3000:]}")
    measured = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("MEASURED "))[9:])
    prepared = json.loads((output_dir / "prepared.json").read_text())
    row = {"engine": engine, "events": prepared["events_read"], "users": prepared["users"], "items": prepared["items"],
            "duplicates_dropped": prepared["duplicates_dropped"], "peak_rss_gib": round(measured["peak_rss_gib"], 3),
            "seconds": round(measured["seconds"], 1)}
    measured_path.write_text(json.dumps(row))
    return row


def pretrain(output_dir: Path, source: list[str], steps: int, max_vocab_size: int) -> dict:
    command = [sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--config", str(ROOT / "recipes" / "configs" / "pinfm_small.yaml"),
               *source, "--output_dir", str(output_dir), "--overwrite_output_dir", "true", "--max_steps", str(steps),
               "--max_vocab_size", str(max_vocab_size), "--eval_every_epochs", "0", "--load_best_model_at_end", "false",
               "--early_stopping_patience", "0", "--max_eval_users", "1000", "--checkpointing_steps", "1000000",
               "--full_softmax", "false"]
    print("$", " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    results = json.loads((output_dir / "results.json").read_text())
    return {"peak_rss_gib": results["peak_rss_gib"], "tokens_per_s": results["tokens_per_s"], "steps": results["steps"],
            "train_seconds": results["train_seconds"],
            "prepare_for_training_seconds": round(results["total_seconds"] - results["train_seconds"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="*", default=[1e6, 1e7, 1e8],
                        help="Events per synthetic log, prepared and measured (none: keep --output's figures).")
    parser.add_argument("--spark_sizes", type=float, nargs="*", default=[1e7], help="Sizes also prepared on Spark.")
    parser.add_argument("--memory_limit", default="3GB", help="DuckDB's --memory_limit.")
    parser.add_argument("--stream_sizes", type=float, nargs="*", default=[1e6, 1e8], help="Sizes pretrained from.")
    parser.add_argument("--stream_steps", type=int, default=100)
    parser.add_argument("--max_vocab_size", type=int, default=50_000, help="Items kept in the vocabulary (the rest hashed).")
    parser.add_argument("--runs_dir", type=Path, default=ROOT / "benchmarks" / "runs" / "scale")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--rerun", action="store_true", help="Prepare again even when a measured preparation exists.")
    args = parser.parse_args()

    started = time.perf_counter()
    rows = []
    for size in map(int, args.sizes):
        log = synthetic_log(args.runs_dir, size)
        for engine in ["duckdb"] + (["spark"] if size in map(int, args.spark_sizes) else []):
            row = prepare(log, args.runs_dir / f"prepared_{engine}_{size:.0e}".replace("+", ""), engine, args.memory_limit, args.rerun)
            rows.append({"size": size, **row})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if not args.sizes and args.output is not None and args.output.exists():
        rows = json.loads(args.output.read_text())["prepare"]  # kept: see the docstring
    seconds = {row["size"]: row["seconds"] for row in rows if row["engine"] == "duckdb"}
    stream = []
    for size in map(int, args.stream_sizes):
        prepared = args.runs_dir / f"prepared_duckdb_{size:.0e}".replace("+", "")
        row = pretrain(args.runs_dir / f"stream_{size:.0e}".replace("+", ""), ["--prepared", str(prepared)],
                       args.stream_steps, args.max_vocab_size)
        stream.append({"size": size, "events": json.loads((prepared / "prepared.json").read_text())["events"], **row})
        print(json.dumps(stream[-1]), file=sys.stderr, flush=True)
    in_memory = None
    if stream:
        smallest = min(map(int, args.stream_sizes))
        (event_file,) = sorted(synthetic_log(args.runs_dir, smallest).glob("*.parquet"))
        in_memory = pretrain(args.runs_dir / "in_memory", ["--dataset", str(event_file)], args.stream_steps, args.max_vocab_size)
        in_memory["size"] = smallest
    report = {
        "memory_limit": args.memory_limit,
        "prepare": rows,
        "prepare_seconds_ratio_1e8_vs_1e7": round(seconds[10**8] / seconds[10**7], 2) if {10**7, 10**8} <= set(seconds) else None,
        "stream": {
            "peak_rss_gib": {str(row["size"]): row["peak_rss_gib"] for row in stream},
            "tokens_per_s_ratio": (
                round(next(r for r in stream if r["size"] == in_memory["size"])["tokens_per_s"] / in_memory["tokens_per_s"], 3)
                if in_memory else None
            ),
            "rows": stream,
            "in_memory": in_memory,
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    emit(report, args.output)


if __name__ == "__main__":
    main()
