"""Cost of PinFM's pretraining losses with the full softmax (forward + backward), variants interleaved in one process.

    python benchmarks/bench_pretraining_losses.py --output benchmarks/results/pretraining_losses.json

At ML-1M's size (batch 64 x 200, ~7k real events, 3,706 items + 1,028 other ids), for next-token only (the
sasrec_like config) and for next + multi + future (pinfm_small):
- the code before 9e454c2: one `full_softmax_loss` per loss, the multi-token pairs subsampled to one per position
  (so its multi-token loss is an estimate; the speed-ups are measured against this row);
- one softmax per loss over every pair (the same losses as the rows below, the plain way);
- one shared softmax, the target logit read from the `(N, V)` logits (commit 9e454c2);
- `PinFMForPretraining` now: the fused cross-entropy for a single loss; for several, one shared softmax with the
  target logit as a dot product.
The last three give the same losses (checked here).
"""

import argparse
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from unittest import mock

from pinfm_hf import PinFMConfig, PinFMForPretraining, PretrainingObjective, losses as pinfm_losses
from pinfm_hf.losses import full_softmax_loss, next_item_losses

from _report import emit  # benchmarks/ is on sys.path when a script runs


# The variants below replace `pinfm_hf.losses._full_softmax_losses` (same signature) while `next_item_losses` runs.


def one_softmax_per_loss(flat_query, flat_targets, pairs, item_embeddings, temperature, num_special_tokens, vocab_size):
    """The reference: every loss scores its own query rows against every item."""
    item_emb = item_embeddings(torch.arange(num_special_tokens, vocab_size))
    return {
        name: full_softmax_loss(flat_query[q], item_emb, flat_targets[t] - num_special_tokens, temperature=temperature).mean()
        for name, (q, t) in pairs.items()
    }


def subsampled_before(max_pairs: int):
    """The code before 9e454c2: like `one_softmax_per_loss`, with at most one pair per real position per loss."""

    def variant(flat_query, flat_targets, pairs, *rest):
        kept = {}
        for name, (q, t) in pairs.items():
            if q.numel() > max_pairs:
                keep = torch.randperm(q.numel())[:max_pairs]
                q, t = q[keep], t[keep]
            kept[name] = (q, t)
        return one_softmax_per_loss(flat_query, flat_targets, kept, *rest)

    return variant


def shared_softmax_indexed_target(flat_query, flat_targets, pairs, item_embeddings, temperature, num_special_tokens, vocab_size):
    """Shared log-partition, the target logit indexed from the logits (a dense (N, V) scatter in backward)."""
    queries = torch.unique(torch.cat([q for q, _ in pairs.values()]))
    item_emb = item_embeddings(torch.arange(num_special_tokens, vocab_size))
    logits = ((flat_query[queries] / temperature) @ item_emb.T).float()
    log_partition = torch.logsumexp(logits, dim=-1)
    losses = {}
    for name, (q, t) in pairs.items():
        row = torch.searchsorted(queries, q)
        losses[name] = (log_partition[row] - logits[row, flat_targets[t] - num_special_tokens]).mean()
    return losses


def batch(args, generator):
    B, T = args.batch_size, args.max_length
    lengths = torch.randint(args.min_length, T + 1, (B,), generator=generator)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    labels = torch.randint(4, 4 + args.items, (B, T), generator=generator).masked_fill(mask == 0, -100)
    actions = torch.randint(2, 7, (B, T), generator=generator) * mask
    query = F.normalize(torch.randn(B, T, args.dim, generator=generator), dim=-1)
    return query, labels, actions, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=200)
    parser.add_argument("--min_length", type=int, default=20, help="Row lengths are uniform in [min_length, max_length].")
    parser.add_argument("--items", type=int, default=3706, help="Item vocabulary (ML-1M: 3,706).")
    parser.add_argument("--other_ids", type=int, default=1024, help="Hash buckets, scored like items in training.")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    query, labels, actions, mask = batch(args, generator)

    objectives = {
        "next-token (sasrec_like)": PretrainingObjective(full_softmax=True),
        "next + multi + future (pinfm_small)": PretrainingObjective(
            full_softmax=True, multi_token_loss_weight=0.5, future_token_loss_weight=0.25, multi_token_window=8,
            future_token_input_length=16,
        ),
    }
    variants = {
        "before 9e454c2: one softmax per loss, multi-token subsampled": subsampled_before(int(mask.sum())),
        "one softmax per loss, every pair": one_softmax_per_loss,
        "shared softmax, indexed target logit (9e454c2)": shared_softmax_indexed_target,
        "PinFMForPretraining now": pinfm_losses._full_softmax_losses,
    }
    report = {"device": "cpu", "threads": torch.get_num_threads(), "platform": platform.platform(),
              "real_events": int(mask.sum()), "vocabulary": 4 + args.items + args.other_ids, "losses": {}}
    config = PinFMConfig(item_vocab_size=4 + args.items + args.other_ids, hidden_size=args.dim, num_hidden_layers=1,
                         num_attention_heads=1)
    torch.manual_seed(0)
    model = PinFMForPretraining(config)
    head, item_table = model.next_item_head, model.pinfm.embeddings.item_embeddings
    for config_name, objective in objectives.items():
        timings, values = {name: [] for name in variants}, {}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for name, variant in variants.items():
                leaf = query.clone().requires_grad_()
                start = time.perf_counter()
                with mock.patch.object(pinfm_losses, "_full_softmax_losses", variant):
                    losses = next_item_losses(
                        leaf, labels, mask, objective=objective,
                        item_embeddings=lambda ids: head.item_embeddings(ids, item_table), temperature=head.temperature,
                        item_log_probs=None, num_special_tokens=config.num_special_item_tokens,
                        vocab_size=config.item_vocab_size,
                    )
                loss = objective.weighted_sum(losses)
                loss.backward()
                elapsed = time.perf_counter() - start
                model.zero_grad(set_to_none=True)
                values[name] = {key: round(value.item(), 5) for key, value in losses.items()} | {"total": loss.item()}
                if repeat:
                    timings[name].append(elapsed)
        exact = list(values.values())[1:]  # the subsampled row estimates its multi-token loss
        if any(abs(v["total"] - exact[0]["total"]) > 1e-4 * abs(exact[0]["total"]) for v in exact):
            raise RuntimeError(f"The variants disagree: {values}")
        medians = {name: sorted(t)[len(t) // 2] for name, t in timings.items()}
        base = next(iter(medians.values()))
        report["losses"][config_name] = {
            name: {"median_ms": round(1000 * m, 1), "speedup": round(base / m, 2), "losses": values[name]}
            for name, m in medians.items()
        }
    emit(report, args.output)


if __name__ == "__main__":
    main()
