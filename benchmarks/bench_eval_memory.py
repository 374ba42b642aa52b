"""Peak memory of full-ranking next-item evaluation over a catalogue of 10^7 items (chunked scoring).

    python benchmarks/bench_eval_memory.py --eval_users 250 1000 --output benchmarks/results/eval_memory.json

`evaluate_next_item` ranks each user's target among every item with history exclusion on, scoring `--chunk_size`
items at a time (`rank_and_top_k`) instead of a dense `(batch_size, items)` matrix (4 GB for 100 users and 10^7
items, plus a bool mask of the same shape). The model is the small shape (hidden and projection 64, 2 layers) with a
random item table of `--items` rows plus 4 special tokens; the loader is synthetic: users with `--history_length`
events, item ids uniform over the catalogue. Each `--eval_users` count runs in a fresh process, whose peak RSS
(`ru_maxrss`: the whole process, item table included) and evaluation time are recorded: chunked, the peak must not
grow with the users. The issue's target is a peak RSS of at most 4 GiB; scoring 10^4 users takes
10^4 x 10^7 x 64 multiply-adds, hours on 2 CPU cores, hence smaller counts by default.

The top-level figures are those of the largest count; `runs` holds one row per count.
"""

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from pinfm_hf import PinFMConfig, PinFMForPretraining
from pinfm_hf.evaluation import evaluate_next_item

from _report import emit  # benchmarks/ is on sys.path when a script runs


TARGET_PEAK_RSS_GIB = 4.0
NUM_SPECIAL_TOKENS = 4  # PinFMConfig's default


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def synthetic_batches(users: int, items: int, history_length: int, batch_size: int, seed: int) -> list[dict]:
    """Held-out-last batches as `PinFMDataCollator` makes them: full rows, item ids uniform over the catalogue."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, users, batch_size):
        B = min(batch_size, users - start)
        ids = torch.randint(NUM_SPECIAL_TOKENS, NUM_SPECIAL_TOKENS + items, (B, history_length + 1), generator=generator)
        times = 978_300_000 + torch.randint(1, 3600, (B, history_length + 1), generator=generator).cumsum(1)
        batches.append({
            "input_ids": ids[:, :-1], "attention_mask": torch.ones(B, history_length, dtype=torch.long),
            "action_ids": torch.full((B, history_length), 2), "timestamps": times[:, :-1],
            "target_ids": ids[:, -1], "target_timestamps": times[:, -1],
        })
    return batches


def measure(args) -> dict:
    """One count of users, in this process: build the model, evaluate, report the peak RSS."""
    torch.manual_seed(args.seed)
    config = PinFMConfig(item_vocab_size=NUM_SPECIAL_TOKENS + args.items, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=2, hidden_dropout_prob=0.0)
    model = PinFMForPretraining(config).eval()
    table = model.pinfm.embeddings.item_embeddings
    item_table_gib = sum(p.numel() * p.element_size() for p in table.parameters()) / 2**30
    accelerator = Accelerator(cpu=True)
    kwargs = dict(num_special_tokens=NUM_SPECIAL_TOKENS, num_scored_ids=config.item_vocab_size, exclude_history=True,
                  chunk_size=args.chunk_size, show_progress=False)
    warmup = synthetic_batches(8, args.items, args.history_length, 8, seed=args.seed + 1)
    evaluate_next_item(model, warmup, accelerator, **kwargs)
    model_rss_gib = peak_rss_gib()
    batches = synthetic_batches(args.measure_users, args.items, args.history_length, args.batch_size, seed=args.seed)
    start = time.perf_counter()
    metrics = evaluate_next_item(model, batches, accelerator, **kwargs)
    seconds = time.perf_counter() - start
    return {
        "eval_users": metrics["num_users"],
        "eval_items": args.items,
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "seconds": round(seconds, 1),
        "chunk_size": args.chunk_size,
        "item_table_gib": round(item_table_gib, 3),
        "peak_rss_before_evaluation_gib": round(model_rss_gib, 3),
        "users_per_s": round(metrics["num_users"] / seconds, 2),
        "mrr": metrics["mrr"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval_users", type=int, nargs="+", default=[250, 1000],
                        help="Users evaluated, one fresh process per count (the issue's figure is 10^4).")
    parser.add_argument("--items", type=int, default=10**7, help="Items in the catalogue (the vocabulary less 4 specials).")
    parser.add_argument("--chunk_size", type=int, default=65_536, help="Items scored at a time (`evaluate_next_item`).")
    parser.add_argument("--batch_size", type=int, default=256, help="Users per evaluation batch.")
    parser.add_argument("--history_length", type=int, default=20, help="Input events per user (all masked as history).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="Write the report as JSON.")
    parser.add_argument("--measure_users", type=int, default=None, help=argparse.SUPPRESS)  # internal: one child run
    args = parser.parse_args()
    if args.measure_users is not None:
        print("MEASURED " + json.dumps(measure(args)), flush=True)
        return

    runs = []
    for users in sorted(args.eval_users):
        command = [sys.executable, __file__, "--measure_users", str(users), "--items", str(args.items), "--chunk_size",
                   str(args.chunk_size), "--batch_size", str(args.batch_size), "--history_length",
                   str(args.history_length), "--seed", str(args.seed)]
        print("$", " ".join(command[1:]), file=sys.stderr, flush=True)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{command[1:]} failed:\n{result.stderr[-3000:]}")
        runs.append(json.loads(next(line for line in result.stdout.splitlines() if line.startswith("MEASURED "))[9:]))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    largest = runs[-1]
    report = {
        **{key: largest[key] for key in ("eval_users", "eval_items", "peak_rss_gib", "seconds", "chunk_size", "item_table_gib")},
        "target_peak_rss_gib": TARGET_PEAK_RSS_GIB,
        "within_target": all(run["peak_rss_gib"] <= TARGET_PEAK_RSS_GIB for run in runs),
        "peak_rss_gib_by_users": {str(run["eval_users"]): run["peak_rss_gib"] for run in runs},
        # what the dense path held per batch: float scores and a bool history mask of (batch_size, vocabulary)
        "dense_batch_gib": round(args.batch_size * (args.items + NUM_SPECIAL_TOKENS) * 5 / 2**30, 2),
        "batch_size": args.batch_size,
        "history_length": args.history_length,
        "exclude_history": True,
        "model": "small (2 layers, hidden 64, projection 64), random weights",
        "device": "cpu",
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "runs": runs,
    }
    emit(report, args.output)


if __name__ == "__main__":
    main()
