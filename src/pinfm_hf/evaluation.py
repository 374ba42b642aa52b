"""Full-ranking next-item evaluation (HSTU protocol), gathered across processes."""

from typing import Callable, NamedTuple, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .embeddings_pinfm import sequence_index
from .metrics import retrieval_metrics, summarize
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


def history_ids(
    input_ids: torch.LongTensor, attention_mask: torch.Tensor, num_ids: int, position_ids: Optional[torch.LongTensor] = None
) -> torch.LongTensor:
    """
    `(num_sequences, max_events)`: the ids of each sequence's real input events, `-1` elsewhere (padding, and ids
    `>= num_ids`). The sparse form of [`history_mask`]: its size does not grow with the vocabulary.
    """
    valid = attention_mask.bool()
    ids = input_ids.masked_fill(~valid | (input_ids >= num_ids), -1)
    if position_ids is None:
        return ids  # one sequence per row, its events at their columns
    rows = sequence_index(valid, position_ids)
    num_sequences = int(((position_ids == 0) & valid).sum())
    width = int(position_ids[valid].max()) + 1 if valid.any() else 0
    history = torch.full((num_sequences, width), -1, dtype=ids.dtype, device=ids.device)
    history[rows[valid], position_ids[valid]] = ids[valid]  # packed sequences: event i of a sequence at column i
    return history


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


class ChunkedRanking(NamedTuple):
    """What [`rank_and_top_k`] returns; the shapes are per query row."""

    ranks: torch.LongTensor  # (B,): 1-based rank of each target, MISS_RANK for a target outside the vocabulary
    top_scores: torch.Tensor  # (B, k): the k best masked scores, best first
    top_ids: torch.LongTensor  # (B, k): their item ids
    non_finite: torch.BoolTensor  # (B,): True where some item's raw score was NaN or infinite


def rank_and_top_k(
    score_ids: Callable[[torch.LongTensor], torch.Tensor],
    target_ids: torch.LongTensor,
    *,
    num_special_tokens: int,
    num_scored_ids: int,
    exclude_ids: Optional[torch.LongTensor] = None,
    k: int = 0,
    chunk_size: int = 65_536,
    device: Optional[torch.device] = None,
) -> ChunkedRanking:
    """
    Full-ranking ranks of `target_ids` and the top-k items, scoring the catalogue `chunk_size` ids at a time, so memory
    is `(B, chunk_size)` whatever the vocabulary (a dense `(B, 10^7)` score matrix does not fit).

    Candidates are the items `[num_special_tokens, num_scored_ids)`: special tokens and hash buckets never are. The
    ranks are those of [`~pinfm_hf.metrics.rank_of_targets`] on the dense scores of
    [`~PinFMForPretraining.score_next_items`] (special tokens and buckets at `-inf`, `exclude_ids` as `exclude_mask`):
    optimistic ties (`rank = 1 + #(score > target score)`), the target itself always a candidate, a NaN target last
    and any other NaN above it, and a special-token target scored `-inf`; a target `>= num_scored_ids` (a hash bucket:
    an item outside the vocabulary) gets `MISS_RANK`. The top-k is what a recommender shows: `torch.topk` of the
    scores with `exclude_ids` at `-inf` (the target gets no exception there), ties in any order. A model's scores of
    a chunk may differ from a full-vocabulary product in the last bit (the BLAS kernel depends on the shape), which can
    move a rank by a near-tie at float32 precision, as a change of device or batch size can.

    Args:
        score_ids (`Callable[[torch.LongTensor], torch.Tensor]`):
            Maps ids `(C,)` to the scores `(B, C)` of every row for them, e.g.
            `lambda ids: model.score_items(query, ids)`; it must return a new tensor (it is written to).
        target_ids (`torch.LongTensor` of shape `(B,)`):
            The id to rank in each row, `>= 0`.
        num_special_tokens (`int`):
            Ids below it are special tokens, never candidates.
        num_scored_ids (`int`):
            Ids from it on (the tokenizer's hash buckets) are never candidates.
        exclude_ids (`torch.LongTensor` of shape `(B, L)`, *optional*):
            Ids that are not candidates for that row (e.g. [`history_ids`]); negative entries are padding.
        k (`int`, *optional*, defaults to 0):
            Size of the top-k; 0 computes ranks only.
        chunk_size (`int`, *optional*, defaults to 65536):
            Ids scored at a time.
        device (`torch.device`, *optional*):
            Where the ids passed to `score_ids` are made; defaults to `target_ids`' device.

    Returns:
        [`ChunkedRanking`]: `ranks`, `top_scores`/`top_ids` (`min(k, number of candidates)` columns) and `non_finite`.
    """
    if target_ids.dim() != 1:
        raise ValueError(f"`target_ids` must have shape (batch_size,), got {tuple(target_ids.shape)}.")
    if not 0 <= num_special_tokens < num_scored_ids:
        raise ValueError(f"`num_special_tokens` ({num_special_tokens}) must be in [0, `num_scored_ids` ({num_scored_ids})).")
    if chunk_size < 1 or k < 0:
        raise ValueError(f"`chunk_size` ({chunk_size}) must be positive and `k` ({k}) non-negative.")
    device = target_ids.device if device is None else device
    targets = target_ids.to(device).long()
    B = targets.shape[0]
    if B and targets.min() < 0:
        raise ValueError(f"`target_ids` must be >= 0, got {targets.min().item()}.")
    if exclude_ids is not None:
        if exclude_ids.dim() != 2 or exclude_ids.shape[0] != B:
            raise ValueError(f"`exclude_ids` must have shape ({B}, L), got {tuple(exclude_ids.shape)}.")
        exclude_ids = exclude_ids.to(device)
    if B == 0:
        return ChunkedRanking(targets, torch.empty(0, 0, device=device), torch.empty(0, 0, dtype=torch.long, device=device),
                              torch.zeros(0, dtype=torch.bool, device=device))
    unknown = targets >= num_scored_ids
    special = targets < num_special_tokens

    # The target scores come first: every chunk counts the items above them. Each distinct target is scored once.
    probe_ids, inverse = targets.masked_fill(unknown | special, num_special_tokens).unique(return_inverse=True)
    target_scores = score_ids(probe_ids).gather(1, inverse[:, None])  # (B, 1)
    # `score > NaN` is never true, so a NaN target would rank first: it ranks last instead, behind every NaN rival.
    target_scores = target_scores.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    target_scores = target_scores.masked_fill(special[:, None], float("-inf"))  # not an item, as score_next_items has it

    above = torch.zeros(B, dtype=torch.long, device=device)
    non_finite = torch.zeros(B, dtype=torch.bool, device=device)
    top_scores, top_ids = target_scores.new_empty(B, 0), torch.empty(B, 0, dtype=torch.long, device=device)
    for lo in range(num_special_tokens, num_scored_ids, chunk_size):
        hi = min(lo + chunk_size, num_scored_ids)
        scores = score_ids(torch.arange(lo, hi, device=device))  # (B, C)
        if scores.shape != (B, hi - lo):
            raise ValueError(f"`score_ids` must return scores of shape {(B, hi - lo)}, got {tuple(scores.shape)}.")
        finite = torch.isfinite(scores).all(dim=1)  # (B,)
        non_finite |= ~finite
        if exclude_ids is not None:
            rows, cols = ((exclude_ids >= lo) & (exclude_ids < hi)).nonzero(as_tuple=True)
            scores[rows, exclude_ids[rows, cols] - lo] = float("-inf")
        if k:
            chunk_top = scores.topk(min(k, hi - lo), dim=1)
            merged_scores = torch.cat([top_scores, chunk_top.values], dim=1)  # (B, <= 2k)
            merged_ids = torch.cat([top_ids, chunk_top.indices + lo], dim=1)
            best = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
            top_scores, top_ids = best.values, merged_ids.gather(1, best.indices)
        if not finite.all():
            scores.nan_to_num_(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))  # a NaN rival ranks above
        rows = ((targets >= lo) & (targets < hi)).nonzero(as_tuple=True)[0]
        scores[rows, targets[rows] - lo] = float("-inf")  # the target never counts itself; its score is target_scores
        above += (scores > target_scores).sum(dim=1)
    ranks = (1 + above).masked_fill(unknown, MISS_RANK)  # a miss at every k: hr and ndcg 0, mrr ~0
    return ChunkedRanking(ranks, top_scores, top_ids, non_finite)


def _positions_in(ids: torch.LongTensor, sorted_ids: torch.LongTensor) -> torch.LongTensor:
    """The position of each of `ids` in `sorted_ids`, -1 where it is absent (or negative: padding)."""
    positions = torch.searchsorted(sorted_ids, ids).clamp_(max=len(sorted_ids) - 1)
    return positions.masked_fill((sorted_ids[positions] != ids) | (ids < 0), -1)


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
    chunk_size: int = 65_536,
    candidate_ids: Optional[torch.LongTensor] = None,
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
    same figures. The catalogue is scored `chunk_size` items at a time ([`rank_and_top_k`]), so memory does not grow
    with the vocabulary. With `candidate_ids` (sorted, unique), only those ids are ranked, whatever `num_scored_ids`
    says: the catalogue of a vocabulary-free model, whose ids are hashes (a target outside it is a miss). Returns
    `hr@k`, `ndcg@k` and `mrr`, averaged over all users of all processes, each counted once.
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
        history = None
        if exclude_history:
            known = num_scored_ids if candidate_ids is None else unwrapped.config.item_vocab_size
            history = history_ids(batch["input_ids"], batch["attention_mask"], known, position_ids)
        if candidate_ids is None:
            ranking = rank_and_top_k(
                lambda ids: unwrapped.score_items(query, ids), targets, num_special_tokens=num_special_tokens,
                num_scored_ids=num_scored_ids, exclude_ids=history, chunk_size=chunk_size, device=query.device,
            )
        else:  # rank positions in the catalogue: position p is the id candidate_ids[p]
            candidates = candidate_ids.to(query.device)
            positions = _positions_in(targets.to(query.device), candidates)
            ranking = rank_and_top_k(
                lambda p: unwrapped.score_items(query, candidates[p]), positions.masked_fill(positions < 0, len(candidates)),
                num_special_tokens=0, num_scored_ids=len(candidates), chunk_size=chunk_size, device=query.device,
                exclude_ids=None if history is None else _positions_in(history, candidates),
            )
        num_bad += int(ranking.non_finite.sum())
        num_rows += query.shape[0]
        all_ranks.append(accelerator.gather_for_metrics(ranking.ranks))
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
