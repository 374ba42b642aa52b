"""Quantised item embedding tables for serving: fp32 vs row-wise int8 vs int4, on ML-1M.

    python benchmarks/bench_quantization.py --output benchmarks/results/quantization_ml1m.json
    python benchmarks/bench_quantization.py --ctr_model outputs/bench_ctr/like/full/model --max_eval_samples 20000 \
        --output benchmarks/results/quantization_ml1m.json

For each variant of the pretrained `--model` (`model.quantize_item_embeddings(bits)` on a fresh load): bytes of the
item table(s) and their ratio to fp32, relative L2 error of the item vectors (all ids) and of the L2-normalised
scoring vectors, and next-item HR@10 / NDCG@10 on the ML-1M leave-last-out test split (HSTU protocol, as
`recipes/pretrain.py` reports it), with the relative change vs fp32. With `--ctr_model` (a `PinFMForCTR` folder saved
by `recipes/finetune_ctr.py`, with its `ctr_features.json` when it uses side features), also AUC / GAUC / logloss on
the same CTR test split the recipe builds (time cut `--cut_quantile`, seeded `--max_eval_samples` subset). Prints a
Markdown table to stderr and the JSON report to stdout.
"""

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader

from pinfm_hf import PinFMForCTR, PinFMForPretraining, PinFMTokenizer
from pinfm_hf.data import (
    FEATURES_FILE_NAME,
    CTRDataset,
    CTRFeatureEncoder,
    PinFMDataCollator,
    ctr_splits,
    load_events_from_args,
    load_user_features_from_args,
    use_case_actions,
)
from pinfm_hf.evaluation import evaluate_ctr, evaluate_next_item

from _report import emit, next_item_loader  # benchmarks/ is on sys.path when a script runs


ROOT = Path(__file__).resolve().parents[1]
FALLBACK_MODEL = ROOT / "outputs" / "demo-ml1m" / "model"
VARIANTS = ("fp32", "int8", "int4")


def load_variant(model_class, folder: Path, variant: str):
    model = model_class.from_pretrained(folder).eval()
    return model if variant == "fp32" else model.quantize_item_embeddings(variant)


def item_table_bytes(model) -> int:
    """Bytes of the item embedding table(s): fp32 weights, or packed values + per-row scales and biases."""
    return sum(t.nbytes for t in model.pinfm.embeddings.item_embeddings.state_dict().values())


def relative_l2(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).norm() / exact.norm())


def relative_change(value: float, reference: float) -> Optional[float]:
    return round((value - reference) / reference, 4) if reference else None


def ctr_loader(args, folder: Path, tokenizer: PinFMTokenizer) -> tuple[DataLoader, int]:
    """The CTR test split of `recipes/finetune_ctr.py` (`ctr_splits`): same use case, time cut, seeded subset, side features."""
    has_features = (folder / FEATURES_FILE_NAME).is_file()
    positive_actions, negative_actions = use_case_actions(args.use_case, args.dataset)
    events = load_events_from_args(args.dataset, args.data_dir)
    data = ctr_splits(
        events, positive_actions=positive_actions, negative_actions=negative_actions, cut_quantile=args.cut_quantile,
        user_features=load_user_features_from_args("auto", args.dataset, args.data_dir) if has_features else None,
        max_test_samples=args.max_eval_samples, seed=args.seed,
    )
    encoder = CTRFeatureEncoder.load(folder) if has_features else None
    dataset = CTRDataset(data.sequences, data.test, tokenizer, max_history=args.max_history, feature_encoder=encoder)
    collator = PinFMDataCollator(pad_token_id=tokenizer.pad_token_id, padding_side="left", max_length=args.max_history + 1)
    return DataLoader(dataset, batch_size=args.ctr_batch_size, collate_fn=collator), data.test.num_rows


def change(value) -> str:
    """A relative change for the table; n/a when the fp32 figure is 0 (no change is defined)."""
    return "n/a" if value is None else f"{value:+.2%}"


def markdown(rows: dict[str, dict]) -> str:
    has_ctr = any("auc" in r for r in rows.values())
    header = "| variant | item table | ratio | rel. L2 | NDCG@10 | HR@10 |" + (" AUC |" if has_ctr else "")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, r in rows.items():
        line = (
            f"| {name} | {r['item_table_bytes'] / 1024:.1f} KiB | {r['bytes_ratio_to_fp32']:.3f} | "
            f"{r['vector_rel_l2']:.4f} | {r['ndcg@10']:.4f} ({change(r['ndcg@10_rel_change'])}) | "
            f"{r['hr@10']:.4f} ({change(r['hr@10_rel_change'])}) |"
        )
        if has_ctr:
            line += f" {r['auc']:.4f} ({r['auc'] - rows['fp32']['auc']:+.4f}) |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "outputs" / "bench_ctr" / "base_ml1m" / "model",
                        help=f"Pretrained folder; falls back to {FALLBACK_MODEL.relative_to(ROOT)} when missing.")
    parser.add_argument("--ctr_model", type=Path, default=None, help="A PinFMForCTR folder from recipes/finetune_ctr.py.")
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--max_length", type=int, default=None, help="Most recent events per user (tokenizer's default).")
    parser.add_argument("--time_cut_quantile", type=float, default=None,
                        help="Next-item split on events before this quantile (default: up to the model's "
                        "`pretraining_max_timestamp`, i.e. the events it was pretrained on).")
    parser.add_argument("--max_eval_users", type=int, default=None, help="Next-item: the first N test users only.")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--use_case", default="like")
    parser.add_argument("--cut_quantile", type=float, default=0.9)
    parser.add_argument("--max_history", type=int, default=50)
    parser.add_argument("--max_eval_samples", type=int, default=None, help="CTR: a seeded subset of N test samples.")
    parser.add_argument("--ctr_batch_size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=42, help="The recipe's seed (its test subset uses seed + 1).")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model_dir = args.model if args.model.is_dir() else FALLBACK_MODEL
    if model_dir != args.model:
        print(f"{args.model} not found: using {model_dir}", file=sys.stderr)
    accelerator = Accelerator(cpu=True)
    start = time.time()

    config = PinFMForPretraining.config_class.from_pretrained(model_dir)
    tokenizer = PinFMTokenizer.from_pretrained(model_dir)
    loader, next_item_cut = next_item_loader(args, tokenizer, config.pretraining_max_timestamp)
    ctr = ctr_loader(args, args.ctr_model, PinFMTokenizer.from_pretrained(args.ctr_model)) if args.ctr_model else None

    rows, reference = {}, {}
    all_ids = torch.arange(config.num_special_item_tokens, tokenizer.first_bucket_id)  # every known item (no specials, no hash buckets)
    for variant in VARIANTS:
        model = load_variant(PinFMForPretraining, model_dir, variant)
        with torch.no_grad():
            vectors = model.pinfm.embeddings.item_embeddings(all_ids)
            scoring = model.item_embeddings(all_ids)
        if variant == "fp32":
            reference = {"vectors": vectors, "scoring": scoring}
        metrics = evaluate_next_item(
            model, loader, accelerator, num_special_tokens=model.config.num_special_item_tokens,
            num_scored_ids=tokenizer.first_bucket_id, ks=(10, 50), show_progress=False,
        )
        row = {
            "item_table_bytes": item_table_bytes(model),
            "vector_rel_l2": round(relative_l2(vectors, reference["vectors"]), 5),
            "scoring_vector_rel_l2": round(relative_l2(scoring, reference["scoring"]), 5),
            "scoring_vector_min_cosine": round(float(F.cosine_similarity(scoring, reference["scoring"], dim=-1).min()), 5),
            **{k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()},
        }
        if ctr is not None:
            ctr_model = load_variant(PinFMForCTR, args.ctr_model, variant)
            ctr_metrics = evaluate_ctr(ctr_model, ctr[0], accelerator, show_progress=False)
            row.update({k: round(float(v), 5) for k, v in ctr_metrics.items()})
        rows[variant] = row
        print(f"{variant}: done after {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    for row in rows.values():
        row["bytes_ratio_to_fp32"] = round(row["item_table_bytes"] / rows["fp32"]["item_table_bytes"], 4)
        for key in ("ndcg@10", "hr@10", "ndcg@50", "hr@50", "mrr"):
            row[f"{key}_rel_change"] = relative_change(row[key], rows["fp32"][key])
        if ctr is not None:
            row["auc_change"] = round(row["auc"] - rows["fp32"]["auc"], 5)

    report = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "dtype": "float32 (lookups return float32 for every variant)",
        "ops": {"int8": "quantized::embedding_bag_byte_prepack / embedding_bag_byte_rowwise_offsets",
                "int4": "quantized::embedding_bag_4bit_prepack / embedding_bag_4bit_rowwise_offsets"},
        "model": str(model_dir),
        "item_tables": {"item_vocab_size": config.item_vocab_size, "hidden_size": config.hidden_size,
                        "num_item_hash_tables": config.num_item_hash_tables},
        "next_item": {"dataset": args.dataset, "split": "leave-last-out test", "users": rows["fp32"]["num_users"],
                      "events_before": next_item_cut},
        "ctr": None if ctr is None else {"model": str(args.ctr_model), "use_case": args.use_case,
                                         "cut_quantile": args.cut_quantile, "test_samples": ctr[1]},
        "variants": rows,
        "seconds": round(time.time() - start, 1),
    }
    print(markdown(rows), file=sys.stderr)
    emit(report, args.output)


if __name__ == "__main__":
    main()
