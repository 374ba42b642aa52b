"""Next-item figures of saved pretraining models under both ranking protocols, side by side.

    python benchmarks/bench_eval_protocol.py outputs/long60/sasrec_like/model outputs/long40/next_only/model \
        --output benchmarks/results/eval_protocol_ml1m.json

For each `PinFMForPretraining` folder: HR/NDCG@10/50/200 and MRR on the ML-1M leave-last-out test split (encoded as
`recipes/pretrain.py` encodes it), once ranking every item ("unmasked") and once without the items of the user's
input events ("history masked", as HSTU's `eval_metrics_v2_from_tensors` does by default with
`filter_invalid_ids=True`), with the ratio masked / unmasked. ML-1M has no repeated (user, item) pair, so a masked
item is never the target. Prints a Markdown table to stderr and the JSON report to stdout.
"""

import argparse
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from pinfm_hf import PinFMForPretraining, PinFMTokenizer
from pinfm_hf.evaluation import evaluate_next_item

from _report import emit, next_item_loader  # the recipe's test split, built once for both protocols

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+", help="Folders saved by recipes/pretrain.py (<run>/model).")
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--max_length", type=int, default=None, help="Most recent events per user (tokenizer's default).")
    parser.add_argument("--max_eval_users", type=int, default=None, help="The first N test users only.")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    accelerator = Accelerator(cpu=True)

    rows = {}
    for folder in args.models:
        if not (folder / "config.json").is_file():
            parser.error(f"{folder} is not a saved model folder (no config.json).")
        model = PinFMForPretraining.from_pretrained(folder).eval()
        tokenizer = PinFMTokenizer.from_pretrained(folder)
        loader, _ = next_item_loader(args, tokenizer, model.config.pretraining_max_timestamp)
        row = {}
        for protocol, exclude_history in (("unmasked", False), ("history_masked", True)):
            row[protocol] = evaluate_next_item(
                model, loader, accelerator, num_special_tokens=model.config.num_special_item_tokens,
                num_scored_ids=tokenizer.first_bucket_id, exclude_history=exclude_history, show_progress=False,
            )
        row["ratio"] = {m: row["history_masked"][m] / row["unmasked"][m] if row["unmasked"][m] else float("nan") for m in METRICS}
        rows[str(folder)] = row
        print(f"{folder}: done", file=sys.stderr, flush=True)

    lines = ["| model | protocol | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 2)]
    for name, row in rows.items():
        for protocol in ("unmasked", "history_masked", "ratio"):
            lines.append(f"| {name} | {protocol} | " + " | ".join(f"{row[protocol][m]:.4f}" for m in METRICS) + " |")
    print("\n".join(lines), file=sys.stderr)
    emit({"device": "cpu", "threads": torch.get_num_threads(), "models": rows}, args.output)


if __name__ == "__main__":
    main()
