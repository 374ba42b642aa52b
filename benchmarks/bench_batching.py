"""How much of a pretraining batch is padding: random batches against `--group_by_length` batches, on ML-1M.

    python benchmarks/bench_batching.py --batch_sizes 64 128

The recipe's training rows (leave-last-out train split, every 200-event window), one epoch each way. Padding costs
encoder compute (the encoder runs over the padded batch; the losses only over real events), so the fraction is the
encoder work that grouping saves. The end-to-end effect on speed and quality: `bench_pretrain.py --variants sasrec_like
sasrec_grouped`.
"""

import argparse
from pathlib import Path

import pyarrow.compute as pc
import torch

from _report import emit
from pinfm_hf import PinFMTokenizer
from pinfm_hf.data import LengthGroupedEpochSampler, build_user_sequences, leave_last_out_split, load_events_from_args


def padding_fraction(lengths: list[int], order: list[int], batch_size: int) -> float:
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    return 1 - sum(lengths) / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--max_length", type=int, default=200)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    events = load_events_from_args("ml-1m", args.data_dir)
    train = leave_last_out_split(build_user_sequences(events))["train"]
    table = PinFMTokenizer.from_events(events, model_max_length=args.max_length).encode_sequences(train, windows=True)
    lengths = pc.list_value_length(table.column("input_ids")).to_pylist()
    report = {"rows": len(lengths), "real_events": sum(lengths), "padding_fraction": {}}
    for batch_size in args.batch_sizes:
        shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
        grouped = list(LengthGroupedEpochSampler(lengths, batch_size, seed=0))
        report["padding_fraction"][f"batch {batch_size}"] = {
            "random": round(padding_fraction(lengths, shuffled, batch_size), 4),
            "grouped": round(padding_fraction(lengths, grouped, batch_size), 4),
        }
    emit(report, args.output)


if __name__ == "__main__":
    main()
