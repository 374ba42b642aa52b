"""CPU bf16 for serving: what it costs in ranking quality (test AUC of a fine-tuned ranker) and what it buys in latency.

    python benchmarks/bench_serving_bf16.py --model outputs/bench_ctr_v2/like/none/seed0/model \\
        --config recipes/configs/ml1m_like.yaml --output benchmarks/results/serving_bf16.json

Quality: the ranker's test impressions (the recipe's own split of `--config`, rebuilt as `finetune_ctr.py` builds
it) scored through DCAT with the weights in fp32 and cast to bf16: AUC, GAUC and logloss of both, and the largest
probability difference. Speed: `bench_serving_latency.py`'s request (256-event history, `--candidates` candidates,
its small and medium models) in fp32 and bf16 on `--threads` threads, side by side in one run (the ratio is the figure;
the machine is noisy). Either part can be skipped (`--model ''`, `--configs`).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from _report import emit  # benchmarks/ is on sys.path when a script runs


ROOT = Path(__file__).resolve().parents[1]


def quality(model_dir: str, config: str) -> dict:
    """Test AUC/GAUC/logloss of the ranker in fp32 and bf16 on its recipe's test impressions."""
    from accelerate import Accelerator

    from pinfm_hf import PinFMForCTR
    from pinfm_hf.evaluation import evaluate_ctr

    sys.path.insert(0, str(ROOT / "recipes"))
    import finetune_ctr
    from pinfm_hf.arguments import CTRDataArguments, CTRModelArguments, CTRTrainingArguments
    from pinfm_hf.training_utils import parse_recipe_args

    data_args, model_args, train_args = parse_recipe_args(
        (CTRDataArguments, CTRModelArguments, CTRTrainingArguments), ["--config", config, "--base", model_dir]
    )
    accelerator = Accelerator(cpu=True)  # before the recipe's data loading, which logs through Accelerate
    data = finetune_ctr.load_data(data_args, model_args, train_args)
    figures = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = PinFMForCTR.from_pretrained(model_dir).to(dtype).eval()
        start = time.perf_counter()
        with torch.inference_mode():
            metrics = evaluate_ctr(model, data.test_loader, accelerator, deduplicate_histories=True, show_progress=False)
        name = "fp32" if dtype == torch.float32 else "bf16"
        figures[name] = {k: round(v, 5) for k, v in metrics.items() if k in ("auc", "gauc", "logloss", "num_samples")}
        figures[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(name, figures[name], file=sys.stderr, flush=True)
    figures["auc_change_points"] = round(100 * (figures["bf16"]["auc"] - figures["fp32"]["auc"]), 3)
    return figures


def latency(configs: list[str], num_candidates: int, threads: int, requests: int) -> list[dict]:
    """p50 of the scorer's request in fp32 and bf16, interleaved request by request so both see the same machine."""
    from bench_serving_latency import build_model_and_tokenizer, make_requests, percentile

    from pinfm_hf.serving import PinFMCandidateScorer, tune_allocator

    tune_allocator()
    torch.set_num_threads(threads)
    rows = []
    for config_name in configs:
        model, tokenizer = build_model_and_tokenizer(config_name, "fp32")
        scorers = {"fp32": PinFMCandidateScorer(model, tokenizer)}
        model_bf16, _ = build_model_and_tokenizer(config_name, "fp32")
        scorers["bf16"] = PinFMCandidateScorer(model_bf16.to(torch.bfloat16), tokenizer)
        bodies = make_requests(num_candidates)
        times = {name: [] for name in scorers}
        for i in range(requests + 10):
            body = bodies[i % len(bodies)]
            for name, scorer in scorers.items():
                start = time.perf_counter()
                scorer.score(body["history"], body["candidates"], body["request_time"]).float().tolist()
                if i >= 10:  # warm-up
                    times[name].append(time.perf_counter() - start)
        fp32, bf16 = (1e3 * percentile(times[n], 50) for n in ("fp32", "bf16"))
        rows.append({"config": config_name, "candidates": num_candidates, "threads": threads, "fp32_p50_ms": round(fp32, 2),
                     "bf16_p50_ms": round(bf16, 2), "bf16_speedup": round(fp32 / bf16, 2)})
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/bench_ctr_v2/like/none/seed0/model",
                        help="A fine-tuned full-model ranker folder ('' skips the quality part).")
    parser.add_argument("--config", default="recipes/configs/ml1m_like.yaml", help="The use-case config it was tuned with.")
    parser.add_argument("--configs", nargs="*", default=["small", "medium"], help="Latency: bench_serving_latency models.")
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    report = {"torch": torch.__version__}
    if args.model:
        report["quality"] = {"model": args.model, "config": args.config, **quality(args.model, args.config)}
    if args.configs:
        report["latency"] = latency(args.configs, args.candidates, args.threads, args.requests)
    emit(report, args.output)


if __name__ == "__main__":
    main()
