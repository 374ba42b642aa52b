"""CTR transfer: every strategy x use case x seed with early stopping, GPSD's scaling check, cold start; one invocation.

    python benchmarks/bench_ctr.py --use_cases like engage --seeds 0 1 2 --jobs 2 --output benchmarks/results/ctr_transfer.json
    python benchmarks/bench_ctr.py --use_cases like --lora_sweep --seeds 0 --jobs 2 --output benchmarks/results/ctr_lora_sweep.json
    python benchmarks/bench_ctr.py --use_cases like --scaling --output benchmarks/results/ctr_ml1m_scaling.json

Each use case's base is pretrained first when missing (`recipes/configs/<data>_ctr_base.yaml`: events before the
same time cut as the CTR split, so nothing of the test period leaks). Then `recipes/finetune_ctr.py` runs once per
(strategy, seed), each in a fresh process, into `--runs_dir/<use case>/<strategy>/seed<k>` (`--jobs` at a time, each
on `--threads` threads); a finished run (results.json) is reused unless `--rerun`. The configs train every strategy
until its AUC on the validation slice (impressions between `validation_cut_quantile` and the test cut) stops rising,
then test the best epoch's weights. The seed picks the training subset, the head's initialisation and the order.

The JSON holds, per `<data set>/<use case>`: `rows` (strategy, seed, auc, gauc, logloss, trainable_share, seconds,
peak_rss_gib, and more), `peers` (from `--peers_json`, written by `benchmarks/bench_ctr_peers.py` on the same samples)
and `base` (epochs, ndcg@10 of the base on its own leave-last-out test). An existing `--output` is updated, not
replaced: other use cases stay. Prints mean +- std over seeds per strategy, with the AUC lift over no transfer.

`--lora_sweep`: LoRA variants (learning rate, rank, modules, a per-item bias) instead of the strategy grid: what made
the adapter pay (benchmarks/RESULTS.md, "CTR transfer").
`--scaling` (GPSD): bases at three sizes, each fine-tuned with no transfer and with sparse transfer + freeze.
`--cold_start`: full transfer without and with PinFM's cold-start switches, with the fresh-item slice.
"""

import argparse
import hashlib
import json
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _report import add_run_arguments, run_once

from pinfm_hf.io_utils import atomic_write_json


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
USE_CASES = {  # use case -> (data set, fine-tuning config, base pretraining config)
    "like": ("ml-1m", "ml1m_like.yaml", "ml1m_ctr_base.yaml"),
    "love": ("ml-1m", "ml1m_love.yaml", "ml1m_ctr_base.yaml"),
    "engage": ("taobao", "taobao_engage.yaml", "taobao_ctr_base.yaml"),
    "purchase": ("taobao", "taobao_purchase.yaml", "taobao_ctr_base.yaml"),
}
STRATEGIES = ("none", "full", "sparse", "sparse_freeze", "full_sparse_freeze", "frozen_backbone", "lora")
LORA_VARIANTS = {  # `--lora_sweep`: what LoRA needs to pay, each on top of the config (the grid's `lora` row is r4,
    # lr 2e-3 without the item bias)
    "r4, lr 1e-2": ["--learning_rate", "0.01", "--ctr_item_bias", "false"],
    "r4, lr 2e-3, item bias": ["--learning_rate", "0.002", "--ctr_item_bias", "true"],
    "r4, lr 1e-2, item bias": ["--learning_rate", "0.01", "--ctr_item_bias", "true"],
    "r2, lr 2e-3, item bias": ["--learning_rate", "0.002", "--ctr_item_bias", "true", "--lora_rank", "2", "--lora_alpha", "4"],
    # 2026-12-05: the config's LoRA (r2, lr 2e-3, item bias) plus an embedding LoRA on the item table
    "r2, item table r1": ["--lora_item_embeddings_rank", "1"],
    "r2, item table r2": ["--lora_item_embeddings_rank", "2"],
    # 2026-12-07: the config's LoRA with larger adapter steps (alpha / rank 8 instead of 2; the head's rate unchanged),
    # and DoRA (the adapted weights' column norms learnt too)
    "r2, alpha 16": ["--lora_alpha", "16"],
    "r2, DoRA": ["--lora_use_dora", "true"],
}
SIZES = {  # GPSD scaling check: three encoder sizes, everything else as the base config (which is d64-l2); small
    # enough for a 2-core CPU (pretraining time grows with size)
    "d16-l1": ["--hidden_size", "16", "--num_hidden_layers", "1", "--num_attention_heads", "2"],
    "d32-l1": ["--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2"],
    "d64-l2": [],
}
SCALING_STRATEGIES = ("none", "sparse_freeze")
COLD_START = {  # `--cold_start`: full transfer without and with PinFM's cold-start switches
    "full, no cold-start switches": [],
    "full + item features in candidate": ["--ctr_candidate_item_features", "true"],
    "full + all cold-start switches": ["--ctr_candidate_item_features", "true", "--candidate_id_randomization", "0.1",
                                       "--ctr_young_item_dropout", "0.5", "--ctr_young_item_age_days", "7"],
}


def pretrain_base(base_config: str, output_dir: Path, extra: list[str], rerun: bool) -> Path:
    command = [sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--config", str(CONFIGS / base_config),
               "--output_dir", str(output_dir), *extra]
    run_once(command, output_dir / "results.json", rerun, ROOT)
    return output_dir / "model"


def finetune(config: str, base: Path, strategy: str, output_dir: Path, extra: list[str], rerun: bool, log: bool = False) -> dict:
    command = [sys.executable, str(ROOT / "recipes" / "finetune_ctr.py"), "--config", str(CONFIGS / config),
               "--base", str(base), "--transfer", strategy, "--output_dir", str(output_dir), *extra]
    return run_once(command, output_dir / "results.json", rerun, ROOT, log=output_dir.parent / f"{output_dir.name}.log" if log else None)


def row(name: str, results: dict, seed: int = None) -> dict:
    test = results["test"]
    return {
        "strategy": name,
        "seed": seed,
        "auc": round(test["auc"], 4),
        "gauc": round(test["gauc"], 4),
        "logloss": round(test["logloss"], 4),
        "trainable_share": round(results["trainable_parameters"] / results["model_parameters"], 4),
        "seconds": results["train_seconds"],
        "peak_rss_gib": results["peak_rss_gib"],
        "trainable_parameters": results["trainable_parameters"],
        "best_epoch": results.get("best_epoch"),
        "epochs_trained": results.get("epochs_trained"),
        "best_valid_auc": results.get("best_valid_auc"),
        "seconds_per_epoch": results["seconds_per_epoch"],
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary_table(rows: list[dict], peers: list[dict]) -> str:
    """Mean +- std over seeds per strategy (and peer), with the AUC lift over no transfer in points."""
    by_name: dict[str, list[dict]] = {}
    for r in rows:
        by_name.setdefault(r["strategy"], []).append(r)
    baseline = mean_std([r["auc"] for r in by_name["none"]])[0] if "none" in by_name else float("nan")
    lines = ["| strategy | seeds | AUC | GAUC | logloss | AUC lift (points) | share | best epoch | train s | peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, group in by_name.items():
        auc, gauc, logloss = (mean_std([r[k] for r in group]) for k in ("auc", "gauc", "logloss"))
        epochs = [r["best_epoch"] for r in group if r["best_epoch"] is not None]
        lines.append(
            f"| {name} | {len(group)} | {auc[0]:.4f} +- {auc[1]:.4f} | {gauc[0]:.4f} +- {gauc[1]:.4f} | "
            f"{logloss[0]:.4f} +- {logloss[1]:.4f} | {100 * (auc[0] - baseline):+.2f} | {100 * group[0]['trainable_share']:.1f}% | "
            f"{statistics.fmean(epochs) if epochs else float('nan'):.1f} | {statistics.fmean(r['seconds'] for r in group):.0f} | "
            f"{max(r['peak_rss_gib'] for r in group):.2f} |"
        )
    by_peer: dict[str, list[dict]] = {}
    for p in peers:
        by_peer.setdefault(p["name"], []).append(p)
    for name, group in by_peer.items():
        auc, gauc, logloss = (mean_std([p[k] for p in group]) for k in ("auc", "gauc", "logloss"))
        lines.append(f"| peer: {name} | {len(group)} | {auc[0]:.4f} +- {auc[1]:.4f} | {gauc[0]:.4f} +- {gauc[1]:.4f} | "
                     f"{logloss[0]:.4f} +- {logloss[1]:.4f} | {100 * (auc[0] - baseline):+.2f} | | | | |")
    return "\n".join(lines)


def base_summary(base: Path) -> dict:
    """The base's pretraining figures: epochs and next-item test NDCG@10 on its own (pre-cut) leave-last-out split."""
    results = json.loads((base.parent / "results.json").read_text())
    return {"epochs": results.get("epochs"), "ndcg@10": results["test"]["ndcg@10"], "hr@10": results["test"]["hr@10"],
            "train_seconds": results.get("train_seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--use_cases", nargs="+", default=["like"], choices=sorted(USE_CASES))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="Fine-tuning runs at a time (each a process).")
    parser.add_argument("--threads", type=int, default=None, help="Torch threads per run (default: torch's own).")
    parser.add_argument("--peers_json", type=Path, default=ROOT / "benchmarks" / "results" / "ctr_peers.json",
                        help="Peer figures on the same samples (benchmarks/bench_ctr_peers.py), copied in when present.")
    parser.add_argument("--lora_sweep", action="store_true", help="LoRA variants instead of the strategy grid.")
    parser.add_argument("--lora_variants", nargs="+", default=list(LORA_VARIANTS), choices=list(LORA_VARIANTS),
                        help="With --lora_sweep: which variants.")
    parser.add_argument("--finished_only", action="store_true",
                        help="Report the runs that have finished (in --runs_dir) and train none: a partial grid.")
    parser.add_argument("--scaling", action="store_true", help="GPSD's scaling check instead of the strategy grid.")
    parser.add_argument("--cold_start", action="store_true", help="Cold-start switches, with the fresh-item slice.")
    add_run_arguments(parser, ROOT / "outputs" / "bench_ctr", "finetune_ctr.py")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the runs are child processes: torch reads it at start
    report = json.loads(args.output.read_text()) if args.output and args.output.exists() else {}
    peers_by_case = json.loads(args.peers_json.read_text()) if args.peers_json.exists() else {}

    for use_case in args.use_cases:
        dataset, config, base_config = USE_CASES[use_case]
        data = base_config.removesuffix("_ctr_base.yaml")
        key = f"{dataset}/{use_case}"
        if args.scaling:
            report[key] = scaling(args, use_case, config, base_config, data, extra)
            continue
        base = pretrain_base(base_config, args.runs_dir / f"base_{data}", [], args.rerun)
        if args.cold_start:
            report[key] = cold_start(args, use_case, config, base, extra)
            continue
        variants = (
            {name: ("lora", LORA_VARIANTS[name]) for name in args.lora_variants} if args.lora_sweep
            else {s: (s, []) for s in args.strategies}
        )
        runs_dir = args.runs_dir / (f"{use_case}_lora_sweep" if args.lora_sweep else use_case)
        plan = [(name, seed) for name in variants for seed in args.seeds]

        # Rows of an earlier invocation (another session's runs folder may be gone) are kept when nothing that makes
        # them changed: same config file, base figures and extra flags; --rerun trains them again.
        config_sha = hashlib.sha256((CONFIGS / config).read_bytes()).hexdigest()[:16]
        earlier = report.get(key, {})
        reusable = not args.rerun and earlier.get("config_sha") == config_sha and earlier.get("extra") == extra and (
            earlier.get("base") == base_summary(base))
        earlier_rows = {(r["strategy"], r["seed"]): r for r in earlier.get("rows", [])} if reusable else {}

        def run(job: tuple[str, int]) -> dict:
            name, seed = job
            strategy, flags = variants[name]
            folder = runs_dir / name.replace(", ", "_").replace(" ", "-") / f"seed{seed}"
            if not (folder / "results.json").exists() and (name, seed) in earlier_rows:
                return earlier_rows[(name, seed)]
            if args.finished_only and not (folder / "results.json").exists():
                print(f"{key} {name} seed {seed}: not trained yet (--finished_only): left out", file=sys.stderr)
                return None
            return row(name, finetune(config, base, strategy, folder, [*flags, "--seed", str(seed), *extra], args.rerun,
                                      log=True), seed)

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            rows = [r for r in pool.map(run, plan) if r is not None]
        done = {(r["strategy"], r["seed"]) for r in rows}  # rows of strategies or seeds not asked this time stay
        rows += [r for k, r in earlier_rows.items() if k not in done]
        peers = peers_by_case.get(use_case, {}).get("peers", []) or earlier.get("peers", [])
        entry = {"config": config, "config_sha": config_sha, "base_config": base_config, "extra": extra,
                 "base": base_summary(base), "rows": rows, "peers": peers}
        if args.lora_sweep:
            entry = {"config": config, "config_sha": config_sha, "extra": extra, "base": entry["base"],
                     "variants": LORA_VARIANTS, "rows": rows}
        report[key] = entry
        print(f"\n{key} (base: {entry['base']})\n" + summary_table(rows, [] if args.lora_sweep else peers), file=sys.stderr)
    if args.output:
        # Re-read before writing: another invocation may have written other use cases to the same file meanwhile.
        latest = json.loads(args.output.read_text()) if args.output.exists() else {}
        written = {f"{USE_CASES[u][0]}/{u}" for u in args.use_cases}
        report = {**latest, **{key: entry for key, entry in report.items() if key in written}}
        atomic_write_json(args.output, report)
    print(json.dumps(report, indent=2))


def cold_start(args, use_case: str, config: str, base: Path, extra: list[str]) -> dict:
    rows = []
    for i, (name, flags) in enumerate(COLD_START.items()):
        r = finetune(config, base, "full", args.runs_dir / f"{use_case}_cold_start" / str(i), [*flags, *extra], args.rerun)
        test = r["test"]
        rows.append({
            "variant": name, "auc": round(test["auc"], 4), "gauc": round(test["gauc"], 4),
            "fresh_samples": test.get("fresh/num_samples", 0), "fresh_auc": round(test.get("fresh/auc", float("nan")), 4),
            "fresh_logloss": round(test.get("fresh/logloss", float("nan")), 4), "seconds": r["train_seconds"],
        })
    lines = ["| variant | AUC | GAUC | fresh-item samples | fresh AUC | fresh logloss | train s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['auc']:.4f} | {r['gauc']:.4f} | {r['fresh_samples']:,} | {r['fresh_auc']:.4f} | "
              f"{r['fresh_logloss']:.4f} | {r['seconds']} |" for r in rows]
    print("\n".join(lines), file=sys.stderr)
    return {"config": config, "rows": rows}


def scaling(args, use_case: str, config: str, base_config: str, data: str, extra: list[str]) -> dict:
    rows = []
    for size, size_flags in SIZES.items():
        # The base config's own size shares its folders with the strategy grid (same runs, not repeated).
        base_dir = args.runs_dir / (f"base_{data}_{size}" if size_flags else f"base_{data}")
        base = pretrain_base(base_config, base_dir, size_flags, args.rerun)
        pretrained = json.loads((base.parent / "results.json").read_text())
        for seed in args.seeds:
            for s in SCALING_STRATEGIES:
                folder = args.runs_dir / (f"{use_case}_scaling/{size}" if size_flags else use_case) / s / f"seed{seed}"
                r = finetune(config, base, s, folder, ["--seed", str(seed), *extra], args.rerun)
                rows.append({"size": size, "base_parameters": pretrained["num_parameters"],
                             "base_ndcg@10": pretrained["test"]["ndcg@10"], **row(s, r, seed)})
    for size in SIZES:
        print(f"\n{size}\n" + summary_table([r for r in rows if r["size"] == size], []), file=sys.stderr)
    return {"config": config, "rows": rows}


if __name__ == "__main__":
    main()
