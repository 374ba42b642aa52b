"""Full-ranking next-item evaluation (HSTU protocol), gathered across processes."""

from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .embeddings_pinfm import sequence_index
from .metrics import rank_of_targets, retrieval_metrics, summarize
from .modeling_pinfm import gather_last_valid, gather_sequence_ends


def history_mask(
    input_ids: torch.LongTensor, attention_mask: torch.Tensor, num_ids: int, position_ids: Optional[torch.LongTensor] = None
) -> torch.BoolTensor:
    """
    `(num_sequences, num_ids)`: True at every id each sequence holds among its real input events (ids `>= num_ids`
    are ignored). A sequence is a row, or with `position_ids` one of the packed sequences, in order.
    """
    valid = attention_mask.bool()
    rows = sequence_index(valid, position_ids)
    num_sequences = input_ids.shape[0] if position_ids is None else int(((position_ids == 0) & valid).sum())
    seen = input_ids.masked_fill(~valid | (input_ids >= num_ids), num_ids)  # padding -> spare column
    mask = torch.zeros(num_sequences, num_ids + 1, dtype=torch.bool, device=input_ids.device)
    return mask.index_put_((rows[valid], seen[valid]), torch.ones((), dtype=torch.bool, device=mask.device))[:, :num_ids]


def check_finite_scores(num_bad: int, num_rows: int, accelerator, *, what: str) -> None:
    """
    Refuse to report metrics computed from NaN or infinite scores (a diverged or corrupted model), which would
    otherwise rank as perfect or as garbage; all processes raise together, so none waits for the others.
    """
    counts = accelerator.reduce(torch.tensor([num_bad, num_rows], device=accelerator.device), reduction="sum")
    num_bad, num_rows = (int(c) for c in counts.tolist())
    if num_bad:
        raise ValueError(
            f"{num_bad} of {num_rows} {what} have non-finite (NaN or infinite) scores: the model's weights or inputs "
            "are not finite, so no metric is reported. Check the checkpoint with a finite-weights load, or retrain."
        )


MISS_RANK = 2**31 - 1  # the rank of a target that cannot be recommended


@torch.no_grad()
def evaluate_next_item(
    model,
    dataloader,
    accelerator,
    *,
    num_special_tokens: int,
    num_scored_ids: int,
    ks: Sequence[int] = (10, 50, 200),
    exclude_history: bool = False,
    show_progress: bool = True,
) -> dict[str, float]:
    """
    Rank each example's `target_ids` among all known items, scored from the user's last position.

    Scored: item ids `[num_special_tokens, num_scored_ids)` (every item of the vocabulary); masked: special tokens and
    hash buckets (ids from `num_scored_ids` on). A target in a hash bucket (an item outside the vocabulary) is a miss. With `exclude_history`, the items of the model's input events are masked
    too, as HSTU's evaluation does (`filter_invalid_ids=True` drops the `past_ids` from its top-k); this suits data
    without repeats, such as MovieLens, and the target itself always stays a candidate (see `rank_of_targets`). The
    target's timestamp, when the batch has `target_timestamps`, is passed as the request time (`end_timestamps`), as
    in training, where position `i` sees the time of event `i + 1`; the target's item and action are never seen.
    Batches of packed rows (`position_ids`, `PinFMDataCollator(pack_length=...)`) are scored per sequence, with the
    same figures. Returns `hr@k`, `ndcg@k` and `mrr`, averaged over all users of all processes, each counted once.
    """
    was_training = model.training
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    all_ranks = []
    num_bad = num_rows = 0
    batches = tqdm(dataloader, desc="evaluate", disable=not (show_progress and accelerator.is_main_process), leave=False)
    for batch in batches:
        targets = batch.pop("target_ids")
        batch.pop("labels", None)
        batch.pop("target_action_ids", None)
        if "target_timestamps" in batch:
            batch["end_timestamps"] = batch.pop("target_timestamps")
        position_ids = batch.get("position_ids")
        query_embeddings = model(**batch).query_embeddings  # through the wrapper
        query = gather_sequence_ends(query_embeddings, batch["attention_mask"], position_ids)  # (users, P)
        scores = unwrapped.score_next_items(query, num_scored_ids=num_scored_ids)[:, :num_scored_ids]  # (users, V')
        num_bad += int((~torch.isfinite(scores[:, num_special_tokens:])).any(dim=1).sum())
        num_rows += scores.shape[0]
        seen = None
        if exclude_history:
            seen = history_mask(batch["input_ids"], batch["attention_mask"], num_scored_ids, position_ids)
        # A target outside the vocabulary (a hash bucket: an item the tokenizer did not keep, e.g. past
        # --max_vocab_size) cannot be recommended: a miss at every k (MISS_RANK: hr and ndcg 0, mrr ~0).
        unknown = targets.to(scores.device) >= num_scored_ids
        ranks = rank_of_targets(scores, targets.to(scores.device).masked_fill(unknown, num_special_tokens),
                                exclude_mask=seen, invalid_ids=list(range(num_special_tokens)))
        ranks = ranks.masked_fill(unknown, MISS_RANK)
        all_ranks.append(accelerator.gather_for_metrics(ranks))
    model.train(was_training)
    check_finite_scores(num_bad, num_rows, accelerator, what="evaluation users")
    ranks = torch.cat(all_ranks)
    metrics = summarize(retrieval_metrics(ranks, ks=ks))
    metrics["num_users"] = int(ranks.numel())
    return metrics


@torch.no_grad()
def evaluate_ctr(
    model,
    dataloader,
    accelerator,
    *,
    deduplicate_histories: bool = False,
    fresh_after: Optional[int] = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """
    AUC, GAUC (per user, impression-weighted) and logloss of a CTR model over a loader of `CTRDataset` batches.
    With `deduplicate_histories`, impressions of one request in a batch share one history encoding (DCAT). With
    `fresh_after` (a timestamp, e.g. the train cut), the same figures on the slice of fresh items (first seen at or
    after it) are added as `fresh/<name>`, with `fresh/num_samples`.
    """
    from .evaluate_metrics import load_ctr_metric

    was_training = model.training
    model.eval()
    predictions, references, users, first_seen = [], [], [], []
    num_bad = num_rows = 0
    batches = tqdm(dataloader, desc="evaluate", disable=not (show_progress and accelerator.is_main_process), leave=False)
    for batch in batches:
        labels = batch.pop("label")
        user_index = batch.pop("user_index")
        logits = model(**batch, deduplicate_histories=True).logits if deduplicate_histories else model(**batch).logits
        probs = torch.sigmoid(logits.float())
        num_bad += int((~torch.isfinite(logits)).sum())
        num_rows += logits.numel()
        if fresh_after is not None:
            if "candidate_age" not in batch:
                raise ValueError("A fresh-item slice needs `candidate_age` in the batches (samples with item_first_seen).")
            item_first_seen = gather_last_valid(batch["timestamps"], batch["attention_mask"]) - batch["candidate_age"]
        else:
            item_first_seen = torch.zeros_like(user_index)
        probs, labels, user_index, item_first_seen = accelerator.gather_for_metrics((probs, labels, user_index, item_first_seen))
        predictions.append(probs.cpu())
        references.append(labels.cpu())
        users.append(user_index.cpu())
        first_seen.append(item_first_seen.cpu())
    model.train(was_training)
    check_finite_scores(num_bad, num_rows, accelerator, what="impressions")
    predictions, references, users = torch.cat(predictions), torch.cat(references).long(), torch.cat(users)
    metric = load_ctr_metric(keep_in_memory=True)
    results = metric.compute(predictions=predictions.numpy(), references=references.numpy(), user_ids=users.numpy())
    if fresh_after is not None:
        fresh = torch.cat(first_seen) >= fresh_after
        results["fresh/num_samples"] = int(fresh.sum())
        if references[fresh].unique().numel() == 2:
            sliced = metric.compute(
                predictions=predictions[fresh].numpy(), references=references[fresh].numpy(), user_ids=users[fresh].numpy()
            )
            results.update({f"fresh/{k}": v for k, v in sliced.items() if k != "num_samples"})
    return results
