"""Large vocabularies: training step time and memory at 10^5 vs 10^7 items, and what hashing and sparse updates cost on ML-1M.

    python benchmarks/bench_large_vocab.py --output benchmarks/results/large_vocab.json

1. Step time and peak RSS (`--sizes`, default 10^5 and 10^7 items): the `pinfm_small` model (d=64, 2 layers) with the
   same packed batch of 4,096 events (Zipf item ids), 1,024 popularity negatives + in-batch negatives, logQ correction,
   the item table trained by row-wise Adagrad over sparse gradients (`--item_optimizer rowwise_adagrad`) and the rest
   by AdamW; each size in a fresh process, `--steps` timed steps after 3 warm-up steps, on `--threads` threads. Also
   one row with AdamW over the whole model at the largest size (`--dense_reference_steps`, 0 to skip): what the
   sparse path avoids. Keys: `step_time_ratio_1e7_vs_1e5`, `table_gib` (the 10^7 x 64 fp32 table), `peak_rss_gib`
   per size, and `rss_bound_gib` (the issue's bound: 2 x table + the 10^5 run's RSS).
2. ML-1M at equal epochs (`--ml1m_epochs`, 0 to skip): `recipes/pretrain.py` with `ml1m_pinfm_small.yaml`, sampled
   softmax (1,024 negatives drawn by `--ml1m_negative_sampling`, as a large catalogue needs), for AdamW (the
   reference), row-wise Adagrad on the item table (`--item_learning_rates`), and the vocabulary-free hashed mode at 2x
   and 10x compression (2 hashed tables of items/2 and items/10 rows); `ml1m_ndcg_ratio` per variant = its test
   NDCG@10 / AdamW's (HSTU protocol).
   Finished runs under `--runs_dir` are reused (`--rerun_ml1m` trains them again).
3. Evaluation memory and the ANN index: the reports of `benchmarks/bench_eval_memory.py` and `benchmarks/bench_ann.py`
   (their `results/*.json`, or fresh runs with `--rerun_scripts`; both take minutes) merged in as `eval`, and
   `ann_recall_at_100`, `ann_speedup` with `ann`.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from _report import emit


ROOT = Path(__file__).resolve().parents[1]
HIDDEN = 64
BATCH_TOKENS = 4096


def measure_steps(vocab_size: int, steps: int, item_optimizer: str, threads: int) -> dict:
    """Train `steps` steps (after 3 warm-up ones) of the small model over `vocab_size` items; time and peak RSS."""
    import numpy as np
    import torch

    from pinfm_hf import PinFMConfig, PinFMForPretraining, PretrainingObjective
    from pinfm_hf.optimization import build_optimizers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = PinFMConfig(
        item_vocab_size=vocab_size, action_vocab_size=7, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=4 * HIDDEN, max_position_embeddings=201, use_action_embeddings=True, use_time_features=True,
        use_input_mlp=True, hidden_dropout_prob=0.2,
    )
    model = PinFMForPretraining(config)
    model.objective = PretrainingObjective(
        full_softmax=False, num_negatives=1024, negative_sampling="popularity", next_token_loss_weight=1.0,
        multi_token_loss_weight=0.5, future_token_loss_weight=0.25, multi_token_window=8, future_token_input_length=16,
    )
    rng = np.random.default_rng(0)
    ranks = np.arange(1, vocab_size - 3, dtype=np.float64)
    popularity = 1.0 / ranks  # Zipf, exponent 1
    model.set_item_counts(torch.from_numpy(np.concatenate([[0, 0, 0, 0], popularity * 1e6])).float())
    optimizers = build_optimizers(model, learning_rate=1e-3, weight_decay=0.01, adam_beta2=0.98,
                                  item_optimizer=item_optimizer, item_learning_rate=0.01)
    cdf = np.cumsum(popularity) / popularity.sum()

    def batch() -> dict:
        # Packed rows of 200 events holding whole users of 5 to 45 events (BATCH_TOKENS in all), ids by popularity.
        rows, row, total = [], [], 0
        while total < BATCH_TOKENS:
            n = int(min(rng.integers(5, 46), BATCH_TOKENS - total))
            if len(row) + n > 200:
                rows.append(row)
                row = []
            row += list(range(n))
            total += n
        rows.append(row)
        shape = (len(rows), 200)
        mask = np.zeros(shape, dtype=np.int64)
        positions = np.zeros(shape, dtype=np.int64)
        for i, r in enumerate(rows):
            mask[i, : len(r)], positions[i, : len(r)] = 1, r
        ids = np.where(mask == 1, 4 + np.searchsorted(cdf, rng.random(shape)), 0)
        timestamps = np.cumsum(rng.integers(1, 3600, size=shape), axis=1) * mask
        t = torch.from_numpy
        return dict(input_ids=t(ids), attention_mask=t(mask), labels=t(np.where(mask == 1, ids, -100)),
                    position_ids=t(positions), action_ids=t(np.where(mask == 1, 2 + rng.integers(0, 5, shape), 0)),
                    timestamps=t(timestamps))

    batches = [batch() for _ in range(4)]
    seconds = []
    for step in range(3 + steps):
        started = time.perf_counter()
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        if step >= 3:
            seconds.append(time.perf_counter() - started)
    return {
        "items": vocab_size, "item_optimizer": item_optimizer, "steps": steps, "threads": threads,
        "step_seconds": round(float(np.median(seconds)), 4), "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "table_gib": round(vocab_size * HIDDEN * 4 / 2**30, 3),
    }


def in_fresh_process(*flags: str) -> dict:
    command = [sys.executable, __file__, "--_measure", *flags]
    print("$", " ".join(command), file=sys.stderr, flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{command} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def ml1m_run(output_dir: Path, epochs: int, *flags: str, rerun: bool = False) -> dict:
    """One ML-1M variant's test figures; a finished run in `output_dir` (its `results.json`) is reused unless `rerun`."""
    command = [sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--config", str(ROOT / "recipes" / "configs" / "ml1m_pinfm_small.yaml"),
               "--output_dir", str(output_dir), "--overwrite_output_dir", "true", "--num_train_epochs", str(epochs),
               "--full_softmax", "false", "--num_negatives", "1024", "--checkpointing_steps", "1000000", *flags]
    if rerun or not (output_dir / "results.json").exists():
        print("$", " ".join(command), file=sys.stderr, flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = json.loads((output_dir / "results.json").read_text())
    return {"ndcg@10": results["test"]["ndcg@10"], "hr@10": results["test"]["hr@10"], "num_parameters": results["num_parameters"],
            "train_seconds": results["train_seconds"]}


def script_report(name: str, rerun: bool) -> dict:
    """A sibling benchmark's report: its `results/<name>.json` as last written, or a fresh run with `rerun`."""
    saved = ROOT / "benchmarks" / "results" / {"bench_eval_memory.py": "eval_memory.json", "bench_ann.py": "ann.json"}[name]
    if saved.exists() and not rerun:
        return json.loads(saved.read_text())
    command = [sys.executable, str(ROOT / "benchmarks" / name), "--output", str(saved)]
    print("$", " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(saved.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="*", default=[1e5, 1e7], help="Item vocabulary sizes to time (none: skip).")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps per size (the median is reported).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dense_reference_steps", type=int, default=5,
                        help="Steps of AdamW over the whole model at the largest size (0: skip).")
    parser.add_argument("--ml1m_epochs", type=int, default=4, help="Epochs of each ML-1M variant (0: skip them).")
    parser.add_argument("--item_learning_rates", type=float, nargs="+", default=[0.2],
                        help="Row-wise Adagrad learning rates tried on ML-1M.")
    parser.add_argument("--ml1m_negative_sampling", default="popularity", choices=["popularity", "uniform"],
                        help="Negatives of every ML-1M variant: uniform draws over a vocabulary-free model's 2^20 ids fall "
                        "mostly on ids of no item, popularity draws only on the data's items.")
    parser.add_argument("--hashed", type=lambda v: v.lower() == "true", default=True, help="Also the hashed variants (true/false).")
    parser.add_argument("--runs_dir", type=Path, default=ROOT / "benchmarks" / "runs" / "large_vocab")
    parser.add_argument("--rerun_ml1m", action="store_true", help="Train the ML-1M variants again even when finished runs exist.")
    parser.add_argument("--skip_eval_memory", action="store_true")
    parser.add_argument("--skip_ann", action="store_true")
    parser.add_argument("--rerun_scripts", action="store_true",
                        help="Run bench_eval_memory.py and bench_ann.py again (default: merge their results/*.json).")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--_measure", nargs=3, metavar=("ITEMS", "OPTIMIZER", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:
        items, optimizer, steps = args._measure
        print(json.dumps(measure_steps(int(float(items)), int(steps), optimizer, args.threads)))
        return

    started = time.perf_counter()
    report = {}
    if args.sizes:  # none: the ML-1M part only
        sizes = sorted(int(s) for s in args.sizes)
        rows = [in_fresh_process(str(size), "rowwise_adagrad", str(args.steps), "--threads", str(args.threads)) for size in sizes]
        if args.dense_reference_steps:
            rows.append(in_fresh_process(str(sizes[-1]), "adamw", str(args.dense_reference_steps), "--threads", str(args.threads)))
        sparse = {row["items"]: row for row in rows if row["item_optimizer"] == "rowwise_adagrad"}
        small, large = sparse[sizes[0]], sparse[sizes[-1]]
        report.update({
            "step_time_ratio_1e7_vs_1e5": round(large["step_seconds"] / small["step_seconds"], 3),
            "table_gib": large["table_gib"],
            "peak_rss_gib": {str(row["items"]): row["peak_rss_gib"] for row in rows if row["item_optimizer"] == "rowwise_adagrad"},
            "rss_bound_gib": round(2 * large["table_gib"] + small["peak_rss_gib"], 3),
            "steps": rows,
        })
    if args.ml1m_epochs:
        sampling = args.ml1m_negative_sampling

        def run(name: str, *flags: str) -> dict:
            return ml1m_run(args.runs_dir / f"{name}_{sampling}", args.ml1m_epochs, "--negative_sampling", sampling, *flags,
                            rerun=args.rerun_ml1m)

        runs = {"adamw": run("adamw")}
        for lr in args.item_learning_rates:
            runs[f"rowwise_adagrad_lr{lr}"] = run(f"rowwise_{lr}", "--item_optimizer", "rowwise_adagrad", "--item_learning_rate", str(lr))
        for compression in (2, 10) if args.hashed else ():
            rows_per_table = -(-3706 // compression)  # ML-1M's items
            runs[f"hashed_{compression}x"] = run(
                f"hashed_{compression}x", "--vocabulary_free", "true", "--num_hash_buckets", str(2**20),
                "--num_item_hash_tables", "2", "--item_hash_table_size", str(rows_per_table),
            )
        report["ml1m_negative_sampling"] = sampling
        reference = runs["adamw"]["ndcg@10"]
        report["ml1m_epochs"] = args.ml1m_epochs
        report["ml1m_ndcg_ratio"] = {name: round(run["ndcg@10"] / reference, 3) for name, run in runs.items() if name != "adamw"}
        report["ml1m_runs"] = runs
    if not args.skip_eval_memory:
        report["eval"] = script_report("bench_eval_memory.py", args.rerun_scripts)
    if not args.skip_ann:
        ann = script_report("bench_ann.py", args.rerun_scripts)
        report.update({"ann_recall_at_100": ann["ann_recall_at_100"], "ann_speedup": ann["ann_speedup"], "ann": ann})
    report["seconds"] = round(time.perf_counter() - started, 1)
    emit(report, args.output)


if __name__ == "__main__":
    main()
