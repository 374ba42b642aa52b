"""CTR fine-tuning: transfer strategies side by side, and GPSD's scaling check, from one invocation.

    python benchmarks/bench_ctr.py --use_case like --output benchmarks/results/ctr_ml1m_like.json
    python benchmarks/bench_ctr.py --use_case engage --output benchmarks/results/ctr_taobao_engage.json
    python benchmarks/bench_ctr.py --use_case like --scaling --output benchmarks/results/ctr_ml1m_scaling.json

The use case's base is pretrained first when missing (`recipes/configs/<data>_ctr_base.yaml`: events before the
same time cut as the CTR split, so nothing of the test period leaks). Then `recipes/finetune_ctr.py` runs once per
strategy, each in a fresh process, into `--runs_dir/<use case>/<strategy>`; a finished run (results.json) is reused
unless `--rerun`. Prints a Markdown table: strategy x AUC, GAUC, logloss, trainable parameters (and their share of the
model), seconds per epoch, and the AUC lift over no transfer in points (x100), all from this one invocation.

`--scaling` (GPSD): pretrains bases at three sizes and fine-tunes each with no transfer and with sparse transfer +
freeze; GPSD reports AUC that keeps growing with size under that strategy.

`--cold_start`: full transfer without and with PinFM's cold-start switches (item features in the candidate token,
candidate-id randomisation, young-item dropout), reporting AUC overall and on the fresh-item slice (items whose first
event is at or after the cut, so the base never saw them: they are hash-bucket ids).
"""

import argparse
import json
import sys
from pathlib import Path

from _report import add_run_arguments, emit, run_once


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
USE_CASES = {  # use case -> (fine-tuning config, base pretraining config)
    "like": ("ml1m_like.yaml", "ml1m_ctr_base.yaml"),
    "love": ("ml1m_love.yaml", "ml1m_ctr_base.yaml"),
    "engage": ("taobao_engage.yaml", "taobao_ctr_base.yaml"),
    "purchase": ("taobao_purchase.yaml", "taobao_ctr_base.yaml"),
}
STRATEGIES = ("none", "full", "sparse", "sparse_freeze", "full_sparse_freeze", "frozen_backbone", "lora")
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


def finetune(config: str, base: Path, strategy: str, output_dir: Path, extra: list[str], rerun: bool) -> dict:
    command = [sys.executable, str(ROOT / "recipes" / "finetune_ctr.py"), "--config", str(CONFIGS / config),
               "--base", str(base), "--transfer", strategy, "--output_dir", str(output_dir), *extra]
    return run_once(command, output_dir / "results.json", rerun, ROOT)


def row(name: str, results: dict, baseline_auc: float) -> dict:
    test = results["test"]
    return {
        "strategy": name,
        "auc": round(test["auc"], 4),
        "gauc": round(test["gauc"], 4),
        "logloss": round(test["logloss"], 4),
        "auc_lift_points": round(100 * (test["auc"] - baseline_auc), 2),
        "trainable_parameters": results["trainable_parameters"],
        "trainable_share": round(results["trainable_parameters"] / results["model_parameters"], 4),
        "seconds_per_epoch": results["seconds_per_epoch"],
        "peak_rss_gib": results["peak_rss_gib"],
    }


def markdown(rows: list[dict], first_column: str = "strategy") -> str:
    lines = [f"| {first_column} | AUC | GAUC | logloss | AUC lift (points) | trainable params | share | s/epoch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r[first_column]} | {r['auc']:.4f} | {r['gauc']:.4f} | {r['logloss']:.4f} | {r['auc_lift_points']:+.2f} | "
            f"{r['trainable_parameters']:,} | {100 * r['trainable_share']:.1f}% | {r['seconds_per_epoch']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--use_case", default="like", choices=sorted(USE_CASES))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--scaling", action="store_true", help="GPSD's scaling check instead of the strategy table.")
    parser.add_argument("--cold_start", action="store_true", help="Cold-start switches, with the fresh-item slice.")
    add_run_arguments(parser, ROOT / "outputs" / "bench_ctr", "finetune_ctr.py")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    config, base_config = USE_CASES[args.use_case]
    data = base_config.removesuffix("_ctr_base.yaml")
    report = {"use_case": args.use_case, "config": config, "base_config": base_config, "extra": extra}

    if args.cold_start:
        base = pretrain_base(base_config, args.runs_dir / f"base_{data}", [], args.rerun)
        report["rows"] = []
        for i, (name, flags) in enumerate(COLD_START.items()):
            r = finetune(config, base, "full", args.runs_dir / f"{args.use_case}_cold_start" / str(i), [*flags, *extra], args.rerun)
            test = r["test"]
            report["rows"].append({
                "variant": name, "auc": round(test["auc"], 4), "gauc": round(test["gauc"], 4),
                "fresh_samples": test.get("fresh/num_samples", 0), "fresh_auc": round(test.get("fresh/auc", float("nan")), 4),
                "fresh_logloss": round(test.get("fresh/logloss", float("nan")), 4), "seconds_per_epoch": r["seconds_per_epoch"],
            })
        lines = ["| variant | AUC | GAUC | fresh-item samples | fresh AUC | fresh logloss | s/epoch |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['auc']:.4f} | {r['gauc']:.4f} | {r['fresh_samples']:,} | {r['fresh_auc']:.4f} | "
                  f"{r['fresh_logloss']:.4f} | {r['seconds_per_epoch']} |" for r in report["rows"]]
        print("\n".join(lines), file=sys.stderr)
    elif not args.scaling:
        base = pretrain_base(base_config, args.runs_dir / f"base_{data}", [], args.rerun)
        results = {s: finetune(config, base, s, args.runs_dir / args.use_case / s, extra, args.rerun) for s in args.strategies}
        baseline = results["none"]["test"]["auc"] if "none" in results else float("nan")
        report["data"] = next(iter(results.values()))["data"]
        report["rows"] = [row(s, r, baseline) for s, r in results.items()]
        print(markdown(report["rows"]), file=sys.stderr)
    else:
        report["rows"] = []
        for size, size_flags in SIZES.items():
            # The base config's own size shares its folders with the strategy table (same runs, not repeated).
            base_dir = args.runs_dir / (f"base_{data}_{size}" if size_flags else f"base_{data}")
            runs_dir = args.runs_dir / (f"{args.use_case}_scaling/{size}" if size_flags else args.use_case)
            base = pretrain_base(base_config, base_dir, size_flags, args.rerun)
            pretrained = json.loads((base.parent / "results.json").read_text())
            by_strategy = {s: finetune(config, base, s, runs_dir / s, extra, args.rerun) for s in SCALING_STRATEGIES}
            baseline = by_strategy["none"]["test"]["auc"]
            for s, r in by_strategy.items():
                report["rows"].append({"size": f"{size} / {s}", "base_parameters": pretrained["num_parameters"],
                                       "base_ndcg@10": pretrained["test"]["ndcg@10"], **row(s, r, baseline)})
        print(markdown(report["rows"], first_column="size"), file=sys.stderr)
    emit(report, args.output)


if __name__ == "__main__":
    main()
