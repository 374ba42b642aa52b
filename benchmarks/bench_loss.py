"""Cost of one full-softmax loss step (forward + backward) at ML-1M's size, variants interleaved in one process.

    python benchmarks/bench_loss.py --output benchmarks/results/loss.json

`full_softmax_loss` divides the `(N, D)` queries by the temperature; the reference divides the `(N, V)` logits, as
the loss did until 2026-11-29. Both give the same loss (checked here); the ratio is the speed-up. A third row runs
`full_softmax_loss` under CPU bf16 autocast, to show what mixed precision would add on this machine, and a fourth runs
it with the log-partition's blocks at 16 MiB of logits (`ScoresLogSumExp.BLOCK_ELEMENTS` before 2026-12-05).

    python benchmarks/bench_loss.py --rows 3500 --items 19385   # a packed Sports step: 3,500 queries, 19,385 items
"""

import argparse
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pinfm_hf.losses import ScoresLogSumExp, full_softmax_loss

from _report import emit  # benchmarks/ is on sys.path when a script runs


def logits_divided_loss(query, item_emb, target_ids, *, temperature):
    """The reference: the temperature divides every one of the N x V logits (and its gradient)."""
    logits = (query @ item_emb.T).float() / temperature
    return F.cross_entropy(logits, target_ids, reduction="none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=7000, help="Scored positions per batch (ML-1M, batch 64: ~7k).")
    parser.add_argument("--items", type=int, default=3706, help="Item vocabulary (ML-1M: 3,706).")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(args.rows, args.dim, generator=generator), dim=-1).requires_grad_()
    items = F.normalize(torch.randn(args.items, args.dim, generator=generator), dim=-1).requires_grad_()
    log_temperature = torch.tensor(0.05).log().requires_grad_()
    targets = torch.randint(0, args.items, (args.rows,), generator=generator)

    def with_blocks(block_elements: int):
        def loss_fn(*args, **kwargs):
            default, ScoresLogSumExp.BLOCK_ELEMENTS = ScoresLogSumExp.BLOCK_ELEMENTS, block_elements
            try:
                return full_softmax_loss(*args, **kwargs)
            finally:
                ScoresLogSumExp.BLOCK_ELEMENTS = default
        return loss_fn

    variants = {
        "logits / temperature (before)": (logits_divided_loss, False),
        "queries / temperature (full_softmax_loss)": (full_softmax_loss, False),
        "queries / temperature, bf16 autocast": (full_softmax_loss, True),
        "full_softmax_loss, 16 MiB blocks": (with_blocks(1 << 22), False),
    }
    losses, timings = {}, {name: [] for name in variants}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, (loss_fn, bf16) in variants.items():
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(query, items, targets, temperature=log_temperature.exp()).mean()
            loss.backward()
            elapsed = time.perf_counter() - start
            query.grad = items.grad = log_temperature.grad = None
            losses[name] = loss.item()
            if repeat:
                timings[name].append(elapsed)
    names = list(variants)
    if abs(losses[names[0]] - losses[names[1]]) > 1e-4 * abs(losses[names[0]]):
        raise RuntimeError(f"The two fp32 variants disagree: {losses}")
    rows = {name: {"median_ms": round(1000 * sorted(t)[len(t) // 2], 1), "loss": round(losses[name], 5)} for name, t in timings.items()}
    report = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "rows_items_dim": [args.rows, args.items, args.dim],
        "variants": rows,
        "speedup_queries_over_logits": round(rows[names[0]]["median_ms"] / rows[names[1]]["median_ms"], 2),
        "speedup_bf16_over_fp32": round(rows[names[1]]["median_ms"] / rows[names[2]]["median_ms"], 2),
        "speedup_blocks_over_16mib_blocks": round(rows[names[3]]["median_ms"] / rows[names[1]]["median_ms"], 2),
    }
    emit(report, args.output)


if __name__ == "__main__":
    main()
