"""
Retrieval losses for PinFM pretraining: sampled softmax (with logQ correction and accidental-hit masking), full
softmax for small vocabularies, negative sampling and a zero-safe masked mean.

This file is copied next to `modeling_pinfm.py` for `trust_remote_code`, so it imports only `torch`.
"""

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F


def _check_temperature(temperature: Union[float, torch.Tensor]) -> None:
    # A tensor temperature is learnable and may live on the GPU: don't sync to check it.
    if not isinstance(temperature, torch.Tensor) and not temperature > 0:
        raise ValueError(f"`temperature` ({temperature}) must be positive.")


def sampled_softmax_loss(
    query: torch.Tensor,
    pos_emb: torch.Tensor,
    neg_emb: torch.Tensor,
    *,
    temperature: Union[float, torch.Tensor],
    pos_ids: Optional[torch.LongTensor] = None,
    neg_ids: Optional[torch.LongTensor] = None,
    pos_log_q: Optional[torch.Tensor] = None,
    neg_log_q: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """
    Per-row sampled-softmax loss: cross-entropy of the positive against sampled negatives (target index 0).

    Args:
        query (`torch.Tensor` of shape `(N, D)`):
            Query embeddings, L2-normalised by the caller.
        pos_emb (`torch.Tensor` of shape `(N, D)`):
            Embedding of each row's positive item, L2-normalised.
        neg_emb (`torch.Tensor` of shape `(R, D)` or `(N, R, D)`):
            Negative item embeddings, shared by all rows or one set per row, L2-normalised.
        temperature (`float` or 0-d `torch.Tensor`):
            Logits are `dot / temperature`. A tensor may be learnable; gradients flow to it.
        pos_ids (`torch.LongTensor` of shape `(N,)`, *optional*):
            Ids of the positives. Together with `neg_ids`, enables accidental-hit masking.
        neg_ids (`torch.LongTensor` of shape `(R,)` or `(N, R)`, *optional*):
            Ids of the negatives. A negative whose id equals its row's positive id is masked out of the softmax.
        pos_log_q (`torch.Tensor` of shape `(N,)`, *optional*):
            Log sampling probability of each positive; subtracted from the positive logit.
        neg_log_q (`torch.Tensor` of shape `(R,)` or `(N, R)`, *optional*):
            Log sampling probability of each negative; subtracted from the negative logits.

    Returns:
        `torch.Tensor` of shape `(N,)` (float32): the loss of each row. Reduce it with `.mean()` or [`masked_mean`].
    """
    if query.dim() != 2 or pos_emb.shape != query.shape:
        raise ValueError(
            f"`query` and `pos_emb` must both have shape (N, D), got {tuple(query.shape)} and {tuple(pos_emb.shape)}."
        )
    N, D = query.shape
    if neg_emb.dim() not in (2, 3) or neg_emb.shape[-1] != D or (neg_emb.dim() == 3 and neg_emb.shape[0] != N):
        raise ValueError(f"`neg_emb` must have shape (R, {D}) or ({N}, R, {D}), got {tuple(neg_emb.shape)}.")
    if (pos_ids is None) != (neg_ids is None):
        raise ValueError("Accidental-hit masking needs both `pos_ids` and `neg_ids` (or neither).")
    _check_temperature(temperature)

    # Scale the (N, D) queries, not the (N, 1 + R) logits: the same numbers, at a fraction of the work and memory
    # traffic in forward and backward.
    query = query / temperature
    pos_logits = (query * pos_emb).sum(-1, keepdim=True)  # [N, 1]
    if neg_emb.dim() == 2:
        neg_logits = query @ neg_emb.T  # [N, R]
    else:
        neg_logits = torch.einsum("nd,nrd->nr", query, neg_emb)  # [N, R]
    # Softmax in float32: bf16 logits lose the small differences the loss is made of.
    logits = torch.cat([pos_logits, neg_logits], dim=-1).float()  # [N, 1 + R]

    if pos_log_q is not None or neg_log_q is not None:
        # logQ correction: popular items are sampled as negatives more often, so subtract log q to unbias the softmax.
        log_q = torch.zeros_like(logits)  # [N, 1 + R]
        if pos_log_q is not None:
            log_q[:, 0] = pos_log_q.float()
        if neg_log_q is not None:
            log_q[:, 1:] = neg_log_q.float()  # [R] or [N, R] -> [N, R]
        logits = logits - log_q

    if pos_ids is not None:
        hits = neg_ids.expand(N, -1) == pos_ids.unsqueeze(-1)  # [N, R]
        hits = torch.cat([torch.zeros_like(hits[:, :1]), hits], dim=-1)  # [N, 1 + R]; never mask the positive
        # finfo.min rather than -inf: with every negative masked the row is still finite (loss 0, no NaN).
        logits = logits.masked_fill(hits, torch.finfo(logits.dtype).min)

    return torch.logsumexp(logits, dim=-1) - logits[:, 0]  # [N]


def full_softmax_loss(
    query: torch.Tensor,
    item_emb: torch.Tensor,
    target_ids: torch.LongTensor,
    *,
    temperature: Union[float, torch.Tensor],
    ignore_index: int = -100,
) -> torch.Tensor:
    """
    Per-row cross-entropy over the whole item vocabulary (for small vocabularies).

    Args:
        query (`torch.Tensor` of shape `(N, D)`):
            Query embeddings, L2-normalised by the caller.
        item_emb (`torch.Tensor` of shape `(V, D)`):
            Embeddings of every candidate item, L2-normalised.
        target_ids (`torch.LongTensor` of shape `(N,)`):
            Index of each row's target in `item_emb`, or `ignore_index`.
        temperature (`float` or 0-d `torch.Tensor`):
            Logits are `dot / temperature`.
        ignore_index (`int`, *optional*, defaults to -100):
            Rows with this target get loss 0.

    Returns:
        `torch.Tensor` of shape `(N,)` (float32): the loss of each row, 0 for ignored rows.
    """
    if query.dim() != 2 or item_emb.dim() != 2 or query.shape[-1] != item_emb.shape[-1]:
        raise ValueError(
            f"`query` (N, D) and `item_emb` (V, D) must share D, got {tuple(query.shape)} and {tuple(item_emb.shape)}."
        )
    if target_ids.shape != query.shape[:1]:
        raise ValueError(f"`target_ids` must have shape ({query.shape[0]},), got {tuple(target_ids.shape)}.")
    logits = full_softmax_logits(query, item_emb, temperature=temperature)  # [N, V]
    return F.cross_entropy(logits, target_ids, ignore_index=ignore_index, reduction="none")  # [N]


def full_softmax_logits(query: torch.Tensor, item_emb: torch.Tensor, *, temperature: Union[float, torch.Tensor]) -> torch.Tensor:
    """`(N, V)` float32 logits `query @ item_emb.T / temperature` of the full softmax."""
    _check_temperature(temperature)
    # Dividing the (N, D) queries rather than the (N, V) logits saves passes over the logits in forward and
    # backward: 1.66x faster at ML-1M's size (benchmarks/bench_loss.py).
    return ((query / temperature) @ item_emb.T).float()


def sample_negatives(
    num_samples: int,
    *,
    vocab_size: Optional[int] = None,
    probs: Optional[torch.Tensor] = None,
    first_id: int = 0,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> tuple[torch.LongTensor, torch.Tensor]:
    """
    Draw negative item ids, with replacement, and their log sampling probabilities (for logQ correction).

    Give exactly one of `vocab_size` (uniform over `[first_id, vocab_size)`) or `probs` (popularity sampling).

    Args:
        num_samples (`int`):
            Number of negatives `R`.
        vocab_size (`int`, *optional*):
            Uniform sampling over ids `[first_id, vocab_size)`; `log_q = -log(vocab_size - first_id)`.
        probs (`torch.Tensor` of shape `(V,)`, *optional*):
            Non-negative sampling weights of every id (normalised here). Ids below `first_id` are never drawn.
            `log_q = log(probs[ids] / probs[first_id:].sum())`. At most 2**24 ids (a `torch.multinomial` limit).
        first_id (`int`, *optional*, defaults to 0):
            Smallest id that may be drawn, e.g. the number of special tokens.
        generator (`torch.Generator`, *optional*):
            For reproducible draws; must live on `device`.
        device (`str` or `torch.device`, *optional*):
            Output device; defaults to `probs.device`, else the CPU.

    Returns:
        `tuple(torch.LongTensor, torch.Tensor)`: the ids, shape `(R,)`, and their float32 `log_q`, shape `(R,)`.
    """
    if not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"`num_samples` ({num_samples}) must be a positive integer.")
    if (vocab_size is None) == (probs is None):
        raise ValueError("Give exactly one of `vocab_size` (uniform sampling) or `probs` (popularity sampling).")
    if first_id < 0:
        raise ValueError(f"`first_id` ({first_id}) must be non-negative.")

    if vocab_size is not None:
        if vocab_size <= first_id:
            raise ValueError(f"`vocab_size` ({vocab_size}) must be greater than `first_id` ({first_id}).")
        ids = torch.randint(first_id, vocab_size, (num_samples,), generator=generator, device=device)  # [R]
        log_q = torch.full((num_samples,), -math.log(vocab_size - first_id), device=ids.device)  # [R]
        return ids, log_q

    if probs.dim() != 1 or probs.shape[0] <= first_id:
        raise ValueError(f"`probs` must have shape (V,) with V > `first_id` ({first_id}), got {tuple(probs.shape)}.")
    weights = probs[first_id:].float()  # [V - first_id]
    if device is not None:
        weights = weights.to(device)
    if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError("`probs` must be finite and non-negative, with a positive sum over ids >= `first_id`.")
    offsets = torch.multinomial(weights, num_samples, replacement=True, generator=generator)  # [R]
    log_q = torch.log(weights[offsets]) - torch.log(weights.sum())  # [R]
    return offsets + first_id, log_q


def masked_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """
    Mean of `loss` over the rows where `mask` is true; zero-safe.

    Args:
        loss (`torch.Tensor` of shape `(N,)`):
            Per-row loss.
        mask (`torch.BoolTensor` of shape `(N,)`):
            Rows to average.

    Returns:
        0-d `torch.Tensor`: the mean, or a 0 that still carries gradients (no NaN) when `mask` is empty.
    """
    if loss.shape != mask.shape:
        raise ValueError(f"`loss` and `mask` must share a shape, got {tuple(loss.shape)} and {tuple(mask.shape)}.")
    mask = mask.bool()
    # `where` (not `loss * mask`) keeps NaN/inf of masked-out rows out; dividing by max(count, 1) avoids a GPU sync.
    total = torch.where(mask, loss, torch.zeros_like(loss)).sum()
    return total / mask.sum().clamp(min=1)
