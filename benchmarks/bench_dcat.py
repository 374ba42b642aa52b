"""DCAT (deduplicated cross-attention) vs naive candidate scoring, side by side from one invocation.

    python benchmarks/bench_dcat.py --output benchmarks/results/dcat.json
    python benchmarks/bench_dcat.py --configs small --scenarios 1x10 1x100 1x1000     # a quick subset

Naive: each candidate appended to its user's sequence and the whole sequence encoded (`PinFMForCTR.forward`, in
chunks of `--naive_batch` rows). DCAT: `PinFMForCTR.score_candidates`: one context pass per user, one crossing pass
for all candidates. Sequence length 256 (full histories, no padding), fp32, inference. For each scenario the two are
timed interleaved (best of `--repeats`), checked to give the same scores (max |diff| printed), and their peak
memory is measured in a fresh process each (peak RSS, sampled every 0.5 ms, above the baseline after building
the model and inputs).

`--training`: CTR training throughput (forward + backward) on real ML-1M `like` batches of whole requests, plain vs
`deduplicate_histories=True` (the history of same-second impressions is encoded once).
"""

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from _report import emit


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "small": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2),
    "medium": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4),
}
SCENARIOS = {"1x10": (1, 10), "1x100": (1, 100), "1x1000": (1, 1000), "64x100": (64, 100)}
LENGTH, VOCAB, ACTIONS = 256, 20_000, 8


def build(config_name: str):
    from pinfm_hf import PinFMConfig, PinFMForCTR

    torch.manual_seed(0)
    config = PinFMConfig(item_vocab_size=VOCAB, action_vocab_size=ACTIONS, max_position_embeddings=LENGTH + 1,
                         hidden_dropout_prob=0.0, **CONFIGS[config_name])
    return PinFMForCTR(config).eval()


def inputs(num_users: int, num_candidates: int):
    g = torch.Generator().manual_seed(1)
    users = dict(
        input_ids=torch.randint(4, VOCAB, (num_users, LENGTH), generator=g),
        action_ids=torch.randint(2, ACTIONS, (num_users, LENGTH), generator=g),
        timestamps=torch.randint(0, 10**7, (num_users, LENGTH), generator=g).sort(dim=1).values,
        attention_mask=torch.ones(num_users, LENGTH, dtype=torch.long),
    )
    candidates = torch.randint(4, VOCAB, (num_users, num_candidates), generator=g)
    request = users["timestamps"][:, -1] + 60
    return users, candidates, request


@torch.inference_mode()
def score_naive(model, users, candidates, request, chunk: int) -> torch.Tensor:
    U, C = candidates.shape
    rows = torch.arange(U).repeat_interleave(C)
    out = []
    for start in range(0, U * C, chunk):
        r = rows[start : start + chunk]
        batch = {
            "input_ids": torch.cat([users["input_ids"][r], candidates.reshape(-1)[start : start + chunk, None]], 1),
            "action_ids": torch.cat([users["action_ids"][r], torch.ones(len(r), 1, dtype=torch.long)], 1),
            "timestamps": torch.cat([users["timestamps"][r], request[r, None]], 1),
            "attention_mask": torch.ones(len(r), LENGTH + 1, dtype=torch.long),
        }
        out.append(model(**batch).logits)
    return torch.cat(out).view(U, C)


@torch.inference_mode()
def score_dcat(model, users, candidates, request) -> torch.Tensor:
    return model.score_candidates(candidate_ids=candidates, request_timestamps=request, **users)


def current_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def memory_probe(config_name: str, scenario: str, method: str, chunk: int) -> None:
    """Child process: build, then score once while a thread samples RSS; print the peak RSS above the baseline (GiB)."""
    model = build(config_name)
    users, candidates, request = inputs(*SCENARIOS[scenario])
    base, peak, running = current_rss_gib(), [0.0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], current_rss_gib())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    if method == "naive":
        score_naive(model, users, candidates, request, chunk)
    else:
        score_dcat(model, users, candidates, request)
    running[0] = False
    sampler.join()
    print(json.dumps({"peak_gib": max(peak[0], current_rss_gib()) - base}))


def measure_memory(config_name: str, scenario: str, method: str, chunk: int) -> float:
    result = subprocess.run(
        [sys.executable, __file__, "--_probe", config_name, scenario, method, "--naive_batch", str(chunk)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_gib"]


def bench_scoring(args) -> list[dict]:
    rows = []
    for config_name in args.configs:
        model = build(config_name)
        for scenario in args.scenarios:
            U, C = SCENARIOS[scenario]
            users, candidates, request = inputs(U, C)
            naive_scores = score_naive(model, users, candidates, request, args.naive_batch)
            dcat_scores = score_dcat(model, users, candidates, request)
            max_diff = float((naive_scores - dcat_scores).abs().max())
            times = {"naive": [], "dcat": []}
            for _ in range(args.repeats):  # interleaved, so both see the same machine
                for name, fn in (("naive", lambda: score_naive(model, users, candidates, request, args.naive_batch)),
                                 ("dcat", lambda: score_dcat(model, users, candidates, request))):
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            naive_s, dcat_s = min(times["naive"]), min(times["dcat"])
            row = {
                "config": config_name, "scenario": f"{U} user(s) x {C} candidates", "candidates": U * C,
                "naive_candidates_per_s": round(U * C / naive_s, 1), "dcat_candidates_per_s": round(U * C / dcat_s, 1),
                "speedup": round(naive_s / dcat_s, 2), "max_abs_diff": max_diff,
            }
            if not args.skip_memory:
                row["naive_peak_gib"] = round(measure_memory(config_name, scenario, "naive", args.naive_batch), 3)
                row["dcat_peak_gib"] = round(measure_memory(config_name, scenario, "dcat", args.naive_batch), 3)
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def bench_training(args) -> dict:
    """Forward + backward on real ML-1M `like` request batches: plain vs deduplicated histories."""
    from pinfm_hf import PinFMConfig, PinFMForCTR, PinFMTokenizer
    from pinfm_hf.data import (CTR_USE_CASES, CTRDataset, CTRImpressionGroups, PinFMDataCollator, build_ctr_samples,
                               collate_impression_groups, load_dataset_by_name)

    events = load_dataset_by_name("ml-1m", args.data_dir)
    case = CTR_USE_CASES["like"]
    sequences, samples = build_ctr_samples(events, positive_actions=case.positive_actions, negative_actions=case.negative_actions)
    tokenizer = PinFMTokenizer.from_events(events)
    groups = CTRImpressionGroups(CTRDataset(sequences, samples, tokenizer, max_history=50))
    collate = collate_impression_groups(PinFMDataCollator(pad_token_id=0, padding_side="left", max_length=51))
    g = torch.Generator().manual_seed(0)
    per_batch = max(1, round(256 / groups.mean_group_size))
    batches = [collate([groups[i] for i in torch.randint(0, len(groups), (per_batch,), generator=g).tolist()])
               for _ in range(args.training_batches)]
    torch.manual_seed(0)
    config = PinFMConfig(item_vocab_size=len(tokenizer), action_vocab_size=tokenizer.action_vocab_size, **CONFIGS["small"])
    model = PinFMForCTR(config).train()
    times = {False: [], True: []}
    samples_total = sum(len(b["label"]) for b in batches)
    for _ in range(args.repeats):
        for dedupe in (False, True):
            start = time.perf_counter()
            for batch in batches:
                batch = dict(batch)
                labels = batch.pop("label")
                batch.pop("user_index")
                model(**batch, labels=labels, deduplicate_histories=dedupe).loss.backward()
            times[dedupe].append(time.perf_counter() - start)
            model.zero_grad()
    plain, dcat = min(times[False]), min(times[True])
    return {
        "mean_impressions_per_request": round(groups.mean_group_size, 3),
        "batches": len(batches), "samples": samples_total,
        "plain_samples_per_s": round(samples_total / plain, 1), "dcat_samples_per_s": round(samples_total / dcat, 1),
        "speedup": round(plain / dcat, 2),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_probe":
        chunk = int(sys.argv[sys.argv.index("--naive_batch") + 1])
        memory_probe(sys.argv[2], sys.argv[3], sys.argv[4], chunk)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=sorted(CONFIGS))
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive_batch", type=int, default=128, help="Rows per naive forward call.")
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--training", action="store_true", help="Also measure CTR training throughput on ML-1M.")
    parser.add_argument("--training_batches", type=int, default=20)
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    report = {
        "threads": torch.get_num_threads(), "torch": torch.__version__, "sequence_length": LENGTH,
        "device": "cpu", "scoring": bench_scoring(args),
    }
    if args.training:
        report["training"] = bench_training(args)
    emit(report, args.output)


if __name__ == "__main__":
    main()
