"""Shared pieces of the benchmark CLIs: run a recipe once (reusing a finished run), the recipe's next-item test split,
print and write the report."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from torch.utils.data import DataLoader

from pinfm_hf.data import (
    PinFMDataCollator,
    build_user_sequences,
    leave_last_out_split,
    load_events_from_args,
    next_item_eval_dataset,
    time_split,
)


def emit(report: dict[str, Any], output: Optional[Path]) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)


def add_run_arguments(parser, runs_dir: Path, recipe: str) -> None:
    """The flags of a benchmark that runs a recipe per row: where the runs go, rerun or reuse, the JSON, extra flags."""
    parser.add_argument("--runs_dir", type=Path, default=runs_dir)
    parser.add_argument("--rerun", action="store_true", help="Train again even when a finished run exists.")
    parser.add_argument("--output", type=Path, default=None, help="Write the collected figures as JSON.")
    parser.add_argument("extra", nargs="...", help=f"After `--`: more {recipe} flags for every run.")


def run_once(command: list[str], results_path: Path, rerun: bool, cwd: Path, log: Optional[Path] = None) -> dict:
    """
    Run a recipe `command` unless its `results_path` exists already (or `rerun`), then return those results. With
    `log`, the run's output goes to that file (runs in parallel do not interleave), and a failure names it.
    """
    if rerun or not results_path.exists():
        print("$", " ".join(command), *([">", str(log)] if log else []), file=sys.stderr, flush=True)
        if log is None:
            subprocess.run(command, cwd=cwd, check=True)
        else:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as out:
                if subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                    raise RuntimeError(f"{' '.join(command)} failed: see {log}")
    return json.loads(results_path.read_text())


def next_item_loader(args, tokenizer, pretraining_max_timestamp: Optional[int]) -> tuple[DataLoader, Optional[int]]:
    """
    The leave-last-out test split, encoded as `recipes/pretrain.py` encodes it (`next_item_eval_dataset`), of the events
    the model was pretrained on: those up to `pretraining_max_timestamp` (a base pretrained with `--time_cut_quantile`
    saw only those, and its tokenizer knows no later item), or before `args.time_cut_quantile`. Reads `args.dataset`,
    `data_dir`, `max_length`, `max_eval_users`, `batch_size`. Returns the loader and the cut (None: all events).
    """
    events = load_events_from_args(args.dataset, args.data_dir)
    cut = None
    if getattr(args, "time_cut_quantile", None) is not None:
        events, _, cut = time_split(events, quantile=args.time_cut_quantile)
    elif pretraining_max_timestamp is not None:
        events, _, cut = time_split(events, cut_timestamp=pretraining_max_timestamp + 1)
    max_length = args.max_length or tokenizer.model_max_length
    split = leave_last_out_split(build_user_sequences(events))["test"]
    data = next_item_eval_dataset(split, tokenizer, max_length=max_length, max_users=args.max_eval_users)
    collator = PinFMDataCollator(pad_token_id=tokenizer.pad_token_id, max_length=max_length)
    return DataLoader(data, batch_size=args.batch_size, collate_fn=collator), cut
