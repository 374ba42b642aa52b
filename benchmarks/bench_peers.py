"""Our generic configs against RecBole's and RecTools' SASRec, side by side in one invocation, at one wall-time budget.

    bash benchmarks/peers/setup_peers.sh          # once: each peer in its own virtual environment (.venv-peers/)
    python benchmarks/bench_peers.py --budget_minutes 30 --output benchmarks/results/peers.json

Systems: `recipes/configs/sasrec_like.yaml` and `recipes/configs/pinfm_small.yaml` through `recipes/pretrain.py`, and
RecBole 1.2.1 SASRec and RecTools 0.19 SASRecModel through `benchmarks/peers/run_*.py` (which never import pinfm_hf).
Each trains for at most `--budget_minutes` of training time (validation and test not counted) on `--threads` threads,
`--jobs` systems at a time, then is tested on the same users and targets:

- ml-1m, HSTU protocol: train on all but each user's last event, test on the last with the 200 events before it as input,
  full ranking with the input's items excluded (ours: `--train_holdout 1`, no validation, the config's
  `eval_exclude_history: auto` resolves to excluded since ratings never repeat; RecBole and RecTools are configured to
  exclude them too: see benchmarks/peers/README.md).
- sports, S3-Rec/TiCoSeRec protocol: train on all but the last two, validation on the second-to-last, test on the last
  (validation event in the input), history excluded, epoch chosen on validation NDCG@10. Ours run the generic configs
  unchanged.

Supervised targets are next-item (query, target) pairs: ours count every event of a training row but its first
(tokens/s x (mean events - 1) / mean events); RecBole supervises one target per training prefix, RecTools every position
of one window per user. `--convergence_minutes` then trains `--convergence_config` on sports once more per
`--convergence_seeds` seed, until early stopping or that budget: the mean of their test NDCG@10 is `sports_ndcg@10`
(else pinfm_small's budget run's). Writes `sports_ndcg@10`, `ndcg_ratio_vs_best_peer` and
`targets_per_s_ratio_vs_recbole` (pinfm_small against the peers on ml-1m), and every run's figures; `--update` keeps
the figures of an existing `--output` that this invocation does not measure:

    python benchmarks/bench_peers.py --systems --convergence_config short_histories --convergence_seeds 42 1 \
        --convergence_minutes 100 --jobs 2 --update --output benchmarks/results/peers.json
"""

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from _report import emit


ROOT = Path(__file__).resolve().parents[1]
OURS = ("sasrec_like", "pinfm_small")
CONFIGS = (*OURS, "short_histories")  # recipes/configs/<name>.yaml, all generic (not named after a data set)
PEERS = ("recbole", "rectools")
# The HSTU protocol on ML-1M: every event but the last trained on, no validation, the budget decides the epochs.
OURS_PROTOCOL = {
    "ml-1m": ["--train_holdout", "1", "--eval_every_epochs", "0", "--load_best_model_at_end", "false",
              "--early_stopping_patience", "0", "--num_train_epochs", "1000"],
    "sports": [],
}
PUBLISHED = {"sports": {"TiCoSeRec (AAAI'23, its README)": {"ndcg@10": 0.0284, "hr@10": 0.0514}}}
METRICS = ("ndcg@10", "hr@10", "hr@200")


def command_for(
    system: str, dataset: str, args: argparse.Namespace, output_dir: Path, minutes: float, threads: int, seed: int
) -> tuple[list[str], Path]:
    """The command that trains and tests `system` on `dataset`, and the JSON it leaves."""
    if system in CONFIGS:
        command = [sys.executable, str(ROOT / "recipes" / "pretrain.py"),
                   "--config", str(ROOT / "recipes" / "configs" / f"{system}.yaml"), "--dataset", dataset,
                   "--data_dir", str(args.data_dir), "--output_dir", str(output_dir), "--overwrite_output_dir", "true",
                   "--max_train_minutes", str(minutes), "--seed", str(seed), *OURS_PROTOCOL[dataset]]
        return command, output_dir / "results.json"
    python = ROOT / ".venv-peers" / system / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} is missing: run `bash benchmarks/peers/setup_peers.sh {system}` first.")
    result = output_dir / "result.json"
    command = [str(python), str(ROOT / "benchmarks" / "peers" / f"run_{system}.py"), "--dataset", dataset,
               "--data_dir", str(args.data_dir), "--time_budget_s", str(60 * minutes),
               "--threads", str(threads), "--output", str(result)]
    return command, result


def run(system: str, dataset: str, args: argparse.Namespace, minutes: Optional[float] = None, threads: Optional[int] = None,
        tag: str = "", seed: int = 42) -> dict:
    """
    Train and test one system for `minutes` (default --budget_minutes) on `threads` (default --threads), reusing a
    finished run unless --rerun; its log goes beside its JSON in `<runs_dir>/<dataset>_<system><tag>`. Returns that JSON.
    """
    minutes, threads = minutes or args.budget_minutes, threads or args.threads
    output_dir = args.runs_dir / f"{dataset}_{system}{tag}"
    command, result = command_for(system, dataset, args, output_dir, minutes, threads, seed)
    if args.rerun or not result.exists():
        output_dir.mkdir(parents=True, exist_ok=True)
        print("$", " ".join(command), file=sys.stderr, flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        with open(output_dir / "run.log", "w") as log:
            completed = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if completed.returncode != 0:
            raise RuntimeError(f"{system} on {dataset} failed (exit {completed.returncode}): see {output_dir / 'run.log'}")
    return json.loads(result.read_text())


def summarize(system: str, result: dict) -> dict:
    """One row: test metrics, training time, supervised targets/s and peak RSS, in the same units for every system."""
    row = {metric: round(result["test"][metric], 4) for metric in METRICS}
    row["test_users"] = result["test"]["num_users"]
    if system in CONFIGS:
        mean_events = result["mean_train_events"]
        row.update(
            train_seconds=result["train_seconds"],
            steps=result["steps"],
            best_step=result.get("best_step"),
            targets_per_s=round(result["tokens_per_s"] * (mean_events - 1) / mean_events, 1),
            peak_rss_gib=result["peak_rss_gib"],
        )
    else:
        row.update(
            library=result["library"],
            train_seconds=result["train_seconds"],
            epochs_completed=result["epochs_completed"],
            stopped_by=result["stopped_by"],
            best_epoch=result["best_epoch"],
            targets_per_s=result["targets_per_s"],
            peak_rss_gib=result["peak_rss_gib"],
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget_minutes", type=float, default=30.0, help="Training time of every system.")
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "sports"], choices=["ml-1m", "sports"])
    parser.add_argument("--systems", nargs="*", default=[*OURS, *PEERS], choices=[*CONFIGS, *PEERS],
                        help="Systems of the budget runs (none: only the convergence runs).")
    parser.add_argument("--threads", type=int, default=2, help="Threads per system (torch and OpenMP).")
    parser.add_argument("--jobs", type=int, default=1,
                        help="Systems trained at once (with --threads 1 and --jobs 2 each has one of two cores).")
    parser.add_argument("--convergence_minutes", type=float, default=0.0,
                        help="Then train --convergence_config on sports for up to this long per seed (its early "
                             "stopping usually ends it first): the figure `sports_ndcg@10` reports. 0: skip.")
    parser.add_argument("--convergence_config", default="pinfm_small", choices=CONFIGS)
    parser.add_argument("--convergence_seeds", type=int, nargs="+", default=[42],
                        help="One convergence run per seed, --jobs at a time; `sports_ndcg@10` is their mean.")
    parser.add_argument("--convergence_threads", type=int, default=None,
                        help="Threads per convergence run (default: the cores shared among --jobs runs).")
    parser.add_argument("--data_dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--runs_dir", type=Path, default=ROOT / "outputs" / "bench_peers")
    parser.add_argument("--rerun", action="store_true", help="Train again even when a finished run exists.")
    parser.add_argument("--output", type=Path, default=None, help="Write the collected figures as JSON.")
    parser.add_argument("--update", action="store_true",
                        help="Keep the figures of the existing --output that this invocation does not measure.")
    args = parser.parse_args()
    args.runs_dir, args.data_dir = args.runs_dir.resolve(), args.data_dir.resolve()

    pairs = [(dataset, system) for dataset in args.datasets for system in args.systems]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = dict(zip(pairs, pool.map(lambda pair: summarize(pair[1], run(pair[1], pair[0], args)), pairs)))

    report = json.loads(args.output.read_text()) if args.update and args.output and args.output.exists() else {}
    if pairs:
        report.update(budget_minutes=args.budget_minutes, threads_per_system=args.threads, systems_at_once=args.jobs)
    if args.convergence_minutes:
        config, seeds = args.convergence_config, args.convergence_seeds
        threads = args.convergence_threads or max(1, (os.cpu_count() or 1) // min(args.jobs, len(seeds)))
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(
                lambda seed: run(config, "sports", args, args.convergence_minutes, threads, tag=f"_convergence_seed{seed}",
                                seed=seed),
                seeds,
            ))
        mean = {metric: round(sum(r["test"][metric] for r in results) / len(results), 5) for metric in METRICS}
        report["sports_ndcg@10"] = mean["ndcg@10"]  # five digits: a mean of seeds is finer than one run's four
        report["sports_convergence"] = {
            "config": f"recipes/configs/{config}.yaml", "minutes": args.convergence_minutes, "threads": threads,
            "systems_at_once": min(args.jobs, len(seeds)),
            **mean, "seeds": {str(seed): summarize(config, result) for seed, result in zip(seeds, results)},
        }
    elif ("sports", "pinfm_small") in rows:
        report["sports_ndcg@10"] = rows[("sports", "pinfm_small")]["ndcg@10"]
    ours, peers = rows.get(("ml-1m", "pinfm_small")), [rows[("ml-1m", p)] for p in PEERS if ("ml-1m", p) in rows]
    if ours and peers:
        report["ndcg_ratio_vs_best_peer"] = round(ours["ndcg@10"] / max(max(p["ndcg@10"] for p in peers), 1e-12), 3)
    if ours and ("ml-1m", "recbole") in rows:
        report["targets_per_s_ratio_vs_recbole"] = round(ours["targets_per_s"] / rows[("ml-1m", "recbole")]["targets_per_s"], 1)
    for dataset in args.datasets if args.systems else ():
        report[dataset] = {system: rows[(dataset, system)] for system in args.systems}
        if dataset in PUBLISHED:
            report[dataset]["published"] = PUBLISHED[dataset]
    emit(report, args.output)


if __name__ == "__main__":
    main()
