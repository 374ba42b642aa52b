"""
Full-ranking retrieval metrics. Compute each target's rank once with [`rank_of_targets`], turn ranks into per-example
metrics with [`retrieval_metrics`], gather them across processes (`accelerator.gather_for_metrics`), then average with
[`summarize`].
"""

from typing import Literal, Optional, Sequence, Union

import torch


def rank_of_targets(
    scores: torch.Tensor,
    target_ids: torch.LongTensor,
    *,
    exclude_mask: Optional[torch.BoolTensor] = None,
    invalid_ids: Optional[Union[torch.LongTensor, Sequence[int]]] = None,
    ties: Literal["optimistic", "pessimistic"] = "optimistic",
) -> torch.LongTensor:
    """
    1-based rank of each target among all candidate ids.

    Excluded and invalid ids (e.g. padding, special tokens, already-seen items) are scored `-inf` first; the target
    itself is never excluded, even if `exclude_mask` or `invalid_ids` cover it. A NaN score never helps the target: a
    NaN target ranks last among the candidates, and any other id with a NaN score ranks above it.

    Ties: with `ties="optimistic"` (default), `rank = 1 + #(score > target_score)`, so the target wins every tie. With
    `ties="pessimistic"`, `rank = #(score >= target_score)` over the other ids plus one, so the target loses every tie.

    Args:
        scores (`torch.Tensor` of shape `(batch_size, num_ids)`):
            Score of every candidate id, column `i` being id `i`.
        target_ids (`torch.LongTensor` of shape `(batch_size,)`):
            The id to rank in each row, in `[0, num_ids)`.
        exclude_mask (`torch.BoolTensor` of shape `(batch_size, num_ids)`, *optional*):
            True where an id is not a candidate for that row.
        invalid_ids (`torch.LongTensor` or `Sequence[int]`, *optional*):
            Ids that are never candidates, in any row.
        ties (`str`, *optional*, defaults to `"optimistic"`):
            `"optimistic"` or `"pessimistic"`, see above.

    Returns:
        `torch.LongTensor` of shape `(batch_size,)`: ranks, 1 being the best.
    """
    if scores.dim() != 2:
        raise ValueError(f"`scores` must have shape (batch_size, num_ids), got {tuple(scores.shape)}.")
    B, V = scores.shape
    if target_ids.shape != (B,):
        raise ValueError(f"`target_ids` must have shape ({B},), got {tuple(target_ids.shape)}.")
    if ties not in ("optimistic", "pessimistic"):
        raise ValueError(f"`ties` ({ties!r}) must be 'optimistic' or 'pessimistic'.")
    if B and (target_ids.min() < 0 or target_ids.max() >= V):
        raise ValueError(f"`target_ids` must lie in [0, {V}), got values in [{target_ids.min()}, {target_ids.max()}].")

    target_ids = target_ids.to(scores.device).long().unsqueeze(1)  # [B, 1]
    target_scores = scores.gather(1, target_ids)  # [B, 1]
    # `score > NaN` is never true, so a NaN target would rank first: it ranks last instead, behind every NaN rival.
    target_scores = target_scores.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    scores = scores.nan_to_num(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    if exclude_mask is not None:
        if exclude_mask.shape != scores.shape:
            raise ValueError(f"`exclude_mask` must have shape {tuple(scores.shape)}, got {tuple(exclude_mask.shape)}.")
        scores = scores.masked_fill(exclude_mask.to(scores.device).bool(), float("-inf"))
    if invalid_ids is not None:
        invalid_ids = torch.as_tensor(invalid_ids, dtype=torch.long, device=scores.device).reshape(-1)
        scores[:, invalid_ids] = float("-inf")
    scores.scatter_(1, target_ids, target_scores)  # the target is always a candidate

    if ties == "optimistic":
        return 1 + (scores > target_scores).sum(dim=1)  # [B]
    return (scores >= target_scores).sum(dim=1)  # [B]; counts the target itself once


def retrieval_metrics(ranks: torch.Tensor, ks: Sequence[int] = (10, 50, 200)) -> dict[str, torch.Tensor]:
    """
    Per-example hit rate, NDCG and reciprocal rank from 1-based ranks (one relevant item per example).

    `hr@k = 1[rank <= k]`, `ndcg@k = 1 / log2(rank + 1)` if `rank <= k` else 0, `mrr = 1 / rank`.

    Args:
        ranks (`torch.Tensor` of shape `(batch_size,)`):
            Ranks from [`rank_of_targets`], all >= 1.
        ks (`Sequence[int]`, *optional*, defaults to `(10, 50, 200)`):
            Cut-offs.

    Returns:
        `dict[str, torch.Tensor]`: `hr@k` and `ndcg@k` for each k, then `mrr`; float32, shape `(batch_size,)`.
    """
    if ranks.dim() != 1:
        raise ValueError(f"`ranks` must have shape (batch_size,), got {tuple(ranks.shape)}.")
    if ranks.numel() and ranks.min() < 1:
        raise ValueError(f"`ranks` are 1-based, got a minimum of {ranks.min().item()}.")
    if any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"`ks` ({ks}) must be positive integers.")
    ranks = ranks.float()
    gain = 1.0 / torch.log2(ranks + 1)  # [B]
    metrics = {}
    for k in ks:
        hit = ranks <= k  # [B]
        metrics[f"hr@{k}"] = hit.float()
        metrics[f"ndcg@{k}"] = torch.where(hit, gain, torch.zeros_like(gain))
    metrics["mrr"] = 1.0 / ranks
    return metrics


def summarize(per_example: dict[str, torch.Tensor]) -> dict[str, float]:
    """
    Average per-example metrics (after `accelerator.gather_for_metrics`) into plain floats.

    Args:
        per_example (`dict[str, torch.Tensor]`):
            Metric name to a tensor of per-example values, e.g. the output of [`retrieval_metrics`].

    Returns:
        `dict[str, float]`: the mean of each metric (NaN for an empty tensor).
    """
    return {name: values.double().mean().item() for name, values in per_example.items()}
