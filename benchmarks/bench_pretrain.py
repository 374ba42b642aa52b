"""Pretraining quality and cost on ML-1M (HSTU protocol), variants side by side from one invocation.

    python benchmarks/bench_pretrain.py --variants sasrec_like pinfm_small --epochs 20 --output benchmarks/results/pretrain_ml1m.json
    python benchmarks/bench_pretrain.py --variants next_only next_multi next_multi_future no_actions no_time --epochs 4

Each variant is one `recipes/pretrain.py` run (a fresh process, so peak RSS is its own) in `--runs_dir/<variant>`.
A finished run (its results.json exists) is reused unless `--rerun`; the table reports its own wall time either way.
Prints a Markdown table (HR/NDCG@10/50/200, MRR, wall time, tokens/s, peak RSS) and the NDCG@10 ratio to the first
variant.
"""

import argparse
import json
import sys
from pathlib import Path

from _report import add_run_arguments, run_once


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
PINFM = CONFIGS / "ml1m_pinfm_small.yaml"
VARIANTS = {
    "sasrec_like": (CONFIGS / "ml1m_sasrec_like.yaml", []),
    "pinfm_small": (PINFM, []),
    # Tuning of the baseline (learning rate, number of sampled negatives).
    "sasrec_lr5e3": (CONFIGS / "ml1m_sasrec_like.yaml", ["--learning_rate", "0.005"]),
    "sasrec_neg1024": (CONFIGS / "ml1m_sasrec_like.yaml", ["--num_negatives", "1024"]),
    "sasrec_full_softmax": (CONFIGS / "ml1m_sasrec_like.yaml", ["--full_softmax", "true"]),
    "sasrec_full_softmax_lr5e3": (CONFIGS / "ml1m_sasrec_like.yaml", ["--full_softmax", "true", "--learning_rate", "0.005"]),
    # Learned absolute positions on top of RoPE, as SASRec has them.
    "sasrec_abs_pos": (CONFIGS / "ml1m_sasrec_like.yaml", ["--use_absolute_position_embeddings", "true"]),
    # Stronger regularisation (ML-1M is small: 6,040 users): dropout 0.5 on embeddings and residuals, 0.2 on attention.
    "sasrec_dropout": (CONFIGS / "ml1m_sasrec_like.yaml", ["--hidden_dropout_prob", "0.5", "--attention_dropout", "0.2"]),
    "next_only_dropout": (PINFM, ["--multi_token_loss_weight", "0", "--future_token_loss_weight", "0",
                                  "--hidden_dropout_prob", "0.5", "--attention_dropout", "0.2"]),
    # Batches of similar-length sequences (less padding): speed and quality against the random batches above.
    "sasrec_grouped": (CONFIGS / "ml1m_sasrec_like.yaml", ["--packing", "false", "--group_by_length", "true"]),
    "pinfm_grouped": (PINFM, ["--packing", "false", "--group_by_length", "true"]),
    # Loss ablations on the full-feature model.
    "next_only": (PINFM, ["--multi_token_loss_weight", "0", "--future_token_loss_weight", "0"]),
    "next_multi": (PINFM, ["--future_token_loss_weight", "0"]),
    "next_multi_future": (PINFM, []),
    # Feature ablations on the full-loss model.
    "no_actions": (PINFM, ["--use_action_embeddings", "false"]),
    "no_time": (PINFM, ["--use_time_features", "false"]),
}
METRICS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr")
PUBLISHED = {  # ../shared/data/README.md, from meta-recsys/generative-recommenders
    "SASRec (published)": {"hr@10": .2853, "ndcg@10": .1603, "hr@50": .5474, "ndcg@50": .2185, "hr@200": .7528, "ndcg@200": .2498},
    "HSTU-large (published)": {"hr@10": .3294, "ndcg@10": .1893, "hr@50": .5935, "ndcg@50": .2481, "hr@200": .7839, "ndcg@200": .2771},
}


def run_variant(name: str, runs_dir: Path, epochs: int | None, extra: list[str], rerun: bool) -> dict:
    config, overrides = VARIANTS[name]
    output_dir = runs_dir / name
    command = [sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--config", str(config), "--output_dir", str(output_dir),
               *overrides, *(["--num_train_epochs", str(epochs)] if epochs else []), *extra]
    return run_once(command, output_dir / "results.json", rerun, ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["sasrec_like", "pinfm_small"], choices=sorted(VARIANTS))
    parser.add_argument("--epochs", type=int, default=None, help="Override num_train_epochs for every variant.")
    add_run_arguments(parser, ROOT / "outputs" / "bench_pretrain", "pretrain.py")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    rows = {name: run_variant(name, args.runs_dir, args.epochs, extra, args.rerun) for name in args.variants}

    header = "| variant | " + " | ".join(METRICS) + " | train s | total s | tokens/s | peak RSS GiB | NDCG@10 ratio |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    base = rows[args.variants[0]]["test"]["ndcg@10"]
    for name, result in rows.items():
        test = result["test"]
        lines.append(
            f"| {name} ({result['steps']} steps) | " + " | ".join(f"{test[m]:.4f}" for m in METRICS)
            + f" | {result['train_seconds']} | {result.get('total_seconds', '')} | {result['tokens_per_s']:,.0f}"
            f" | {result['peak_rss_gib']:.2f} | {test['ndcg@10'] / base:.2f} |"
        )
    for name, published in PUBLISHED.items():
        lines.append(f"| {name} | " + " | ".join(f"{published[m]:.4f}" if m in published else "" for m in METRICS) + " | | | | | |")
    print("\n".join(lines))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"runs": rows, "published": PUBLISHED}, indent=2))


if __name__ == "__main__":
    main()
