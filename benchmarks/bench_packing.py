"""Packed against padded pretraining batches, side by side in one invocation: real tokens/s and NDCG@10 at equal epochs.

    python benchmarks/bench_packing.py --output benchmarks/results/packing.json

For each data set, `recipes/pretrain.py` runs twice with the same config (`recipes/configs/pinfm_small.yaml`), the same
model, threads and number of users per step: once with packed rows (`--packing true`: random users concatenated into
rows up to a token budget) and once with padded rows of random users (`--packing false`, batch size = the packed
budget / the mean training sequence, so both see as many users per step). Sports (median history 6) trains for equal
epochs and compares test NDCG@10 too; ML-1M (200-event windows, mostly full) compares speed over `--ml1m_steps`. The
epoch is not chosen on validation here (both runs test their last epoch), so the two are like for like.

Also records which exact attention paths for packed rows run on this machine's torch (CPU): SDPA with a block mask,
`flex_attention` with a document mask, SDPA over nested (jagged) tensors, with the time of a forward and backward.
Writes `tokens_per_s_ratio` and `ndcg_ratio` (Sports), `ml1m_tokens_per_s_ratio`, the Sports pair again with sampled
negatives (`sampled_softmax_tokens_per_s_ratio`, `sampled_softmax_ndcg_ratio`), and each run's figures.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _report import add_run_arguments, emit, run_once


ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "pinfm_small.yaml"
# Equal epochs, no epoch selection: both runs test their last weights.
FIXED_EPOCHS = ("--eval_every_epochs", "0", "--load_best_model_at_end", "false", "--early_stopping_patience", "0")
KEPT = ("tokens_per_s", "train_seconds", "steps", "peak_rss_gib", "per_device_train_batch_tokens", "mean_train_events")


def run_pair(dataset: str, runs_dir: Path, flags: list[str], rerun: bool, tag: str = "") -> dict:
    """The packed run, then the padded run with as many users per step (run folders `<dataset><tag>_packed|padded`)."""
    def run(name: str, extra: list[str]) -> dict:
        output_dir = runs_dir / f"{dataset}{tag}_{name}"
        command = [sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--config", str(CONFIG), "--dataset", dataset,
                   "--output_dir", str(output_dir), "--overwrite_output_dir", "true", *FIXED_EPOCHS, *flags, *extra]
        return run_once(command, output_dir / "results.json", rerun, ROOT)

    packed = run("packed", ["--packing", "true"])
    users_per_step = max(1, round(packed["per_device_train_batch_tokens"] / packed["mean_train_events"]))
    padded = run("padded", ["--packing", "false", "--per_device_train_batch_size", str(users_per_step)])
    row = {name: {**{k: result.get(k) for k in KEPT}, "test_ndcg@10": result["test"]["ndcg@10"]}
           for name, result in (("packed", packed), ("padded", padded))}
    row["padded"]["per_device_train_batch_size"] = users_per_step
    row["tokens_per_s_ratio"] = round(packed["tokens_per_s"] / padded["tokens_per_s"], 3)
    row["ndcg_ratio"] = round(packed["test"]["ndcg@10"] / max(padded["test"]["ndcg@10"], 1e-12), 4)
    return row


def attention_paths(rows: int = 16, length: int = 200, heads: int = 2, head_dim: int = 32, mean_sequence: int = 8) -> dict:
    """Which exact block-diagonal causal attention runs forward and backward here, and its time (ms) per call."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(rows, heads, length, head_dim, requires_grad=True) for _ in range(3))
    lengths = torch.distributions.Geometric(probs=1 / mean_sequence).sample((rows * length,)).long() + 1
    starts = torch.zeros(rows, length, dtype=torch.bool)
    position, i = 0, 0
    while position < rows * length:
        starts.view(-1)[position] = True
        position += int(lengths[i])
        i += 1
    starts[:, 0] = True
    sequence_ids = starts.long().cumsum(1)
    mask = torch.ones(length, length, dtype=torch.bool).tril() & (sequence_ids[:, :, None] == sequence_ids[:, None, :])
    mask = mask[:, None]

    def timed(step) -> str:
        try:
            step()
            start = time.perf_counter()
            for _ in range(10):
                step()
            return f"{(time.perf_counter() - start) / 10 * 1e3:.1f} ms"
        except Exception as error:  # noqa: BLE001 (a path that does not run here is the finding)
            return f"unavailable: {type(error).__name__}: {str(error).splitlines()[0][:160]}"

    def sdpa_block_mask():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()

    def flex_document_mask():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def document_causal(b, h, q_index, kv_index):
            return (q_index >= kv_index) & (sequence_ids[b, q_index] == sequence_ids[b, kv_index])

        block_mask = create_block_mask(document_causal, rows, None, length, length, device="cpu")
        torch.compile(flex_attention)(q, k, v, block_mask=block_mask).sum().backward()

    def nested_jagged():
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(starts.view(-1)).squeeze(1)[1:],
                             torch.tensor([rows * length])])
        flat = [x.transpose(1, 2).reshape(rows * length, heads, head_dim) for x in (q, k, v)]
        jagged = [torch.nested.nested_tensor_from_jagged(x, offsets).transpose(1, 2) for x in flat]
        F.scaled_dot_product_attention(*jagged, is_causal=True).values().sum().backward()

    return {
        "shape": f"{rows} rows x {length} events, {heads} heads x {head_dim}, sequences of {mean_sequence} events on average",
        "sdpa_block_mask": timed(sdpa_block_mask),
        "flex_attention_document_mask": timed(flex_document_mask),
        "sdpa_nested_jagged_causal": timed(nested_jagged),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sports_epochs", type=int, default=5, help="Equal epochs of the Sports pair.")
    parser.add_argument("--sampled_epochs", type=int, default=2, help="Equal epochs of the sampled-negatives Sports pair.")
    parser.add_argument("--ml1m_steps", type=int, default=150, help="Steps of the ML-1M pair (speed only).")
    add_run_arguments(parser, ROOT / "outputs" / "bench_packing", "pretrain.py")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]

    sports = run_pair("sports", args.runs_dir, ["--num_train_epochs", str(args.sports_epochs), *extra], args.rerun)
    # The same pair with 1,024 sampled negatives instead of the full softmax over ~19k items: the loss, the same cost
    # packed or padded, then no longer hides what packing saves in the encoder.
    sampled = run_pair("sports", args.runs_dir, ["--num_train_epochs", str(args.sampled_epochs), "--full_softmax", "false",
                                                *extra], args.rerun, tag="_sampled_softmax")
    ml1m = run_pair("ml-1m", args.runs_dir, ["--max_steps", str(args.ml1m_steps), *extra], args.rerun)
    emit({
        "config": str(CONFIG.relative_to(ROOT)),
        "threads": torch.get_num_threads(),
        "tokens_per_s_ratio": sports["tokens_per_s_ratio"],
        "ndcg_ratio": sports["ndcg_ratio"],
        "ml1m_tokens_per_s_ratio": ml1m["tokens_per_s_ratio"],
        "sampled_softmax_tokens_per_s_ratio": sampled["tokens_per_s_ratio"],
        "sampled_softmax_ndcg_ratio": sampled["ndcg_ratio"],
        "sports": {"epochs": args.sports_epochs, **sports},
        "sports_sampled_softmax": {"epochs": args.sampled_epochs, **sampled},
        "ml-1m": {"steps": args.ml1m_steps, **ml1m},
        "attention_paths": attention_paths(),
    }, args.output)


if __name__ == "__main__":
    main()
