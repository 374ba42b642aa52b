"""Encoder forward throughput (tokens/s) of the small and medium configs at sequence length 200.

    python benchmarks/bench_encoder.py --output benchmarks/results/encoder.json

Both configs run in the same process, interleaved, so their ratio is robust to machine noise.
"""

import argparse
import platform
import time
from pathlib import Path

import torch

from pinfm_hf import PinFMConfig, PinFMModel

from _report import emit  # benchmarks/ is on sys.path when a script runs


CONFIGS = {
    "small (2 layers, d=64)": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2),
    "medium (4 layers, d=256)": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4),
}


def make_inputs(batch_size: int, seq_len: int, vocab: int, generator: torch.Generator) -> dict:
    ids = torch.randint(4, vocab, (batch_size, seq_len), generator=generator)
    actions = torch.randint(2, 7, (batch_size, seq_len), generator=generator)
    timestamps = 978_300_000 + torch.randint(0, 3600, (batch_size, seq_len), generator=generator).cumsum(1)
    return {"input_ids": ids, "action_ids": actions, "timestamps": timestamps, "attention_mask": torch.ones_like(ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seq_len", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    inputs = {k: v.to(args.device) for k, v in make_inputs(args.batch_size, args.seq_len, args.vocab, generator).items()}
    models = {
        name: PinFMModel(PinFMConfig(item_vocab_size=args.vocab, action_vocab_size=8, **cfg)).to(args.device, dtype).eval()
        for name, cfg in CONFIGS.items()
    }
    timings = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model(**inputs)
        for _ in range(args.repeats):
            for name, model in models.items():
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(**inputs)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                timings[name].append(time.perf_counter() - start)
    tokens = args.batch_size * args.seq_len
    rows = {}
    for name, model in models.items():
        best = min(timings[name])
        rows[name] = {
            "tokens_per_s": round(tokens / best),
            "median_tokens_per_s": round(tokens / sorted(timings[name])[len(timings[name]) // 2]),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
    names = list(rows)
    report = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "configs": rows,
        "small_over_medium_ratio": round(rows[names[0]]["tokens_per_s"] / rows[names[1]]["tokens_per_s"], 2),
    }
    emit(report, args.output)


if __name__ == "__main__":
    main()
