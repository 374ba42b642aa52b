"""
Retrieval losses for PinFM pretraining: sampled softmax (with logQ correction and accidental-hit masking), full
softmax for small vocabularies, negative sampling, a zero-safe masked mean, a contrastive loss between two dropout
views, and the pretraining objective ([`PretrainingObjective`], [`next_item_losses`]: PinFM's next-, multi- and
future-token losses).

This file is copied next to `modeling_pinfm.py` for `trust_remote_code`, so it imports only `torch`.
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch


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
    _check_temperature(temperature)
    keep = target_ids != ignore_index
    # Dividing the (N, D) queries rather than the (N, V) logits saves passes over the logits (bench_loss.py).
    query = query[keep] / temperature
    kept_targets = target_ids[keep]
    # The target's logit as a dot product: indexing (N, V) logits would scatter its gradient into a dense (N, V) tensor.
    target_logit = (query * item_emb[kept_targets]).sum(-1).float()
    loss = torch.zeros(target_ids.shape, dtype=torch.float32, device=query.device)
    return loss.masked_scatter(keep, scores_logsumexp(query, item_emb) - target_logit)


def scores_logsumexp(query: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
    """
    `logsumexp(query @ item_emb.T, dim=-1)` in float32, `(N, D), (V, D) -> (N,)`, without an `(N, V)` tensor.

    The log-partition of the full softmax, computed over blocks of queries and recomputed in backward
    ([`ScoresLogSumExp`]): on a CPU the unfused version spends most of a pretraining step moving `(N, V)` logits,
    their exponentials and their gradient through memory (benchmarks/RESULTS.md, "Packed batches"). Under autocast
    the products run in the autocast dtype, as `query @ item_emb.T` would; the softmax stays in float32.
    """
    return ScoresLogSumExp.apply(query, item_emb)


class ScoresLogSumExp(torch.autograd.Function):
    """
    [`scores_logsumexp`]: blocks of about `BLOCK_ELEMENTS` logits at a time, exact in float32.

    Each block's logits live in one reused buffer that stays in cache, and every pass over it is in place: the
    product, the shift, `exp_`, a row sum. The shift is the Cauchy-Schwarz bound `|q_i| * max_j |e_j|` on row `i`'s
    logits rather than their maximum, which would be one more pass; where that bound is too loose for float32 (above
    `MAX_BOUND_SHIFT`, e.g. a tiny temperature) the row's maximum is used. In backward the incoming gradient scales the
    `(n, D)` operands, not the `(n, V)` probabilities.
    """

    BLOCK_ELEMENTS = 1 << 20  # 4 MiB of float32 logits: 1.3x faster than 16 MiB blocks on this CPU (RESULTS.md)
    # exp(-2 * 40) is ~1.8e-35, still a normal float32: with a bound up to 40 the shifted row sum cannot underflow.
    MAX_BOUND_SHIFT = 40.0

    @staticmethod
    def _compute_dtype(query: torch.Tensor, item_emb: torch.Tensor) -> torch.dtype:
        device_type = query.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return torch.promote_types(query.dtype, item_emb.dtype)

    @staticmethod
    def _blocks(num_queries: int, num_items: int) -> range:
        return range(0, num_queries, max(1, ScoresLogSumExp.BLOCK_ELEMENTS // max(num_items, 1)))

    @staticmethod
    def _logits(q: torch.Tensor, items: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        """`q @ items.T` written into (a leading slice of) the float32 `buffer`."""
        out = buffer[: q.shape[0]]
        if q.dtype == torch.float32:
            return torch.mm(q, items.T, out=out)
        return out.copy_(q @ items.T)

    @staticmethod
    def forward(ctx, query: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
        dtype = ScoresLogSumExp._compute_dtype(query, item_emb)
        q, items = query.to(dtype), item_emb.to(dtype)
        blocks = ScoresLogSumExp._blocks(q.shape[0], items.shape[0])
        buffer = torch.empty(min(blocks.step, q.shape[0]), items.shape[0], dtype=torch.float32, device=q.device)
        bound = q.float().norm(dim=-1) * items.float().norm(dim=-1).max() if items.shape[0] else q.new_zeros(q.shape[0])
        log_partition = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
        for start in blocks:
            rows = slice(start, start + blocks.step)
            logits = ScoresLogSumExp._logits(q[rows], items, buffer)  # (n, V)
            shift = bound[rows]
            if bool((shift > ScoresLogSumExp.MAX_BOUND_SHIFT).any()):
                shift = logits.amax(dim=-1)
            log_partition[rows] = logits.sub_(shift[:, None]).exp_().sum(dim=-1).log_().add_(shift)
        ctx.save_for_backward(q, items, log_partition)
        ctx.input_dtypes = (query.dtype, item_emb.dtype)
        return log_partition

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, items, log_partition = ctx.saved_tensors
        grad_query = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        grad_items = torch.zeros(items.shape, dtype=torch.float32, device=q.device)
        blocks = ScoresLogSumExp._blocks(q.shape[0], items.shape[0])
        buffer = torch.empty(min(blocks.step, q.shape[0]), items.shape[0], dtype=torch.float32, device=q.device)
        grad_output = grad_output.float()
        for start in blocks:
            rows = slice(start, start + blocks.step)
            # d logsumexp / d logits = softmax, made in place in the buffer; grad_output scales the (n, D) sides.
            probs = ScoresLogSumExp._logits(q[rows], items, buffer).sub_(log_partition[rows, None]).exp_().to(q.dtype)
            scale = grad_output[rows, None]
            grad_query[rows] = (probs @ items).float().mul_(scale)
            if probs.dtype == torch.float32:
                grad_items.addmm_(probs.T, q[rows] * scale)
            else:  # autocast: the product in its dtype, accumulated in float32
                grad_items += (probs.T @ (q[rows] * scale).to(q.dtype)).float()
        query_dtype, items_dtype = ctx.input_dtypes
        return grad_query.to(query_dtype), grad_items.to(items_dtype)


def sample_negatives(
    num_samples: int,
    *,
    vocab_size: Optional[int] = None,
    probs: Optional[torch.Tensor] = None,
    cdf: Optional[torch.Tensor] = None,
    first_id: int = 0,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> tuple[torch.LongTensor, torch.Tensor]:
    """
    Draw negative item ids, with replacement, and their log sampling probabilities (for logQ correction).

    Give exactly one of `vocab_size` (uniform over `[first_id, vocab_size)`), `probs` (popularity sampling) or `cdf`
    (popularity sampling from a precomputed [`popularity_cdf`]: a binary search per draw, so the cost does not grow
    with the vocabulary; what training uses).

    Args:
        num_samples (`int`):
            Number of negatives `R`.
        vocab_size (`int`, *optional*):
            Uniform sampling over ids `[first_id, vocab_size)`; `log_q = -log(vocab_size - first_id)`.
        probs (`torch.Tensor` of shape `(V,)`, *optional*):
            Non-negative sampling weights of every id (normalised here). Ids below `first_id` are never drawn.
            `log_q = log(probs[ids] / probs[first_id:].sum())`. At most 2**24 ids (a `torch.multinomial` limit).
        cdf (`torch.Tensor` of shape `(V - first_id,)`, *optional*):
            `popularity_cdf(log_probs, first_id)`: float64, non-decreasing, ending at 1. `log_q` is the log of each
            drawn id's step of the cdf.
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
    if sum(x is not None for x in (vocab_size, probs, cdf)) != 1:
        raise ValueError("Give exactly one of `vocab_size` (uniform sampling), `probs` or `cdf` (popularity sampling).")
    if first_id < 0:
        raise ValueError(f"`first_id` ({first_id}) must be non-negative.")

    if cdf is not None:
        draws = torch.rand(num_samples, dtype=cdf.dtype, generator=generator, device=cdf.device)  # [R] in [0, 1)
        offsets = torch.searchsorted(cdf, draws, right=True).clamp_(max=cdf.numel() - 1)  # first step above each draw
        below = torch.where(offsets > 0, cdf[(offsets - 1).clamp_(min=0)], torch.zeros((), dtype=cdf.dtype, device=cdf.device))
        log_q = torch.log(cdf[offsets] - below).float()  # [R]
        ids = offsets + first_id
        return (ids, log_q) if device is None else (ids.to(device), log_q.to(device))

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


def popularity_cdf(log_probs: torch.Tensor, first_id: int = 0) -> torch.Tensor:
    """
    The cumulative distribution (float64, ending at exactly 1) of `exp(log_probs)` over ids `[first_id, V)`, for
    [`sample_negatives`]`(cdf=...)`: computed once per vocabulary, not at every step.
    """
    cdf = log_probs[first_id:].double().exp().cumsum(0)
    return cdf / cdf[-1]


def contrastive_loss(
    view_a: torch.Tensor,
    view_b: torch.Tensor,
    target_ids: Optional[torch.LongTensor] = None,
    *,
    temperature: float,
) -> torch.Tensor:
    """
    InfoNCE between two views of the same queries (DuoRec's model-level augmentation: two forward passes with
    different dropout masks). Each query's other view is its positive and the other queries' views its negatives,
    in both directions; queries with the same next item are not negatives of each other (DuoRec's false-negative
    mask), since pulling them apart would fight the next-item loss.

    Args:
        view_a, view_b (`torch.Tensor` of shape `(N, P)`):
            L2-normalised embeddings of the same N queries from two passes.
        target_ids (`torch.LongTensor` of shape `(N,)`, *optional*):
            Each query's next item, for the false-negative mask.
        temperature (`float`):
            Logits are `cosine / temperature`.

    Returns:
        0-d `torch.Tensor`: the mean loss over queries and both directions (0 with gradients when `N` is 0).
    """
    if view_a.dim() != 2 or view_a.shape != view_b.shape:
        raise ValueError(f"`view_a` and `view_b` must both have shape (N, P), got {tuple(view_a.shape)} and {tuple(view_b.shape)}.")
    _check_temperature(temperature)
    N = view_a.shape[0]
    if N == 0:
        return (view_a.sum() + view_b.sum()) * 0.0
    logits = (view_a / temperature @ view_b.T).float()  # (N, N); the diagonal holds the positives
    if target_ids is not None:
        same_target = target_ids.unsqueeze(0) == target_ids.unsqueeze(1)
        same_target.fill_diagonal_(False)
        logits = logits.masked_fill(same_target, torch.finfo(logits.dtype).min)
    labels = torch.arange(N, device=logits.device)
    return (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2


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


LOSS_NAMES = ("next_token", "multi_token", "future_token", "contrastive")


@dataclass
class PretrainingObjective:
    """
    What a PinFM model is pretrained on (PinFM's next-, multi- and future-token losses) and how the softmax over items
    is estimated. Not part of the model config: a trained model scores the same whatever objective trained it. The
    recipes parse it as arguments; set it on a model with `model.objective = PretrainingObjective(...)`. Which events
    are targets is the data's business: events whose `labels` are -100 are never targets (`PinFMDataCollator`'s
    `positive_action_ids`).
    """

    next_token_loss_weight: float = field(
        default=1.0, metadata={"help": "Weight of the next-token loss (predict event i + 1 from position i)."}
    )
    multi_token_loss_weight: float = field(
        default=0.0, metadata={"help": "Weight of the multi-token loss (every target among the next multi_token_window events)."}
    )
    future_token_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the future-token loss (from the end of each future_token_input_length window, every "
                  "target among the multi_token_window events after it)."},
    )
    multi_token_window: int = field(default=8, metadata={"help": "Future events L' the multi- and future-token losses look at."})
    future_token_input_length: int = field(default=16, metadata={"help": "Input window L_d of the future-token loss."})
    num_negatives: int = field(default=512, metadata={"help": "Negatives sampled per batch (shared by its rows)."})
    negative_sampling: str = field(default="uniform", metadata={"help": "'uniform' or 'popularity' (item counts of the data)."})
    use_in_batch_negatives: bool = field(
        default=True, metadata={"help": "Also use the batch's target items as negatives (at most num_negatives of them)."}
    )
    use_log_q_correction: bool = field(
        default=True, metadata={"help": "Subtract each candidate's log sampling probability from its logit."}
    )
    full_softmax: str = field(
        default="false",
        metadata={"help": "'true': score every item instead of sampling (small vocabularies); 'false': sampled negatives; "
                  "'auto': every item when the catalogue is small enough (the recipe's --full_softmax_max_items).",
                  "choices": ["auto", "true", "false"]},
    )
    initial_temperature: float = field(default=0.05, metadata={"help": "Starting value of the learnable softmax temperature."})
    contrastive_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of a contrastive loss between two dropout passes over the batch (DuoRec): each "
                  "next-token query is pulled towards its other view and away from the other queries. Costs a second "
                  "encoder pass; needs dropout. Helps sparse, short-history logs."},
    )
    contrastive_temperature: float = field(default=0.2, metadata={"help": "Temperature of the contrastive loss."})
    contrastive_max_queries: int = field(
        default=1024, metadata={"help": "Next-token queries per batch in the contrastive loss (uniform subsample): its cost grows as their square."}
    )
    contrastive_item_mask_prob: float = field(
        default=0.0,
        metadata={"help": "Share of the input items replaced by the mask token in the contrastive loss's second pass "
                  "(CL4SRec's item-mask augmentation, on top of the dropout views); 0 keeps the inputs as they are."},
    )
    same_time_shuffle_prob: float = field(
        default=0.0,
        metadata={"help": "Share of the runs of same-timestamp events (within one sequence) whose order is shuffled in "
                  "training inputs and targets: a log with day-granularity times does not know the order within a day "
                  "(TiCoSeRec's reorder where the time interval is zero); 0 keeps the logged order."},
    )
    contrastive_same_time_shuffle_prob: float = field(
        default=0.0,
        metadata={"help": "The same reorder of same-timestamp runs, in the contrastive loss's second pass only (a "
                  "time-aware augmentation of the second view); 0 keeps the logged order there."},
    )

    def __post_init__(self):
        for name in ("next_token_loss_weight", "multi_token_loss_weight", "future_token_loss_weight", "contrastive_loss_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)!r}.")
        for name in (
            "multi_token_window", "future_token_input_length", "num_negatives", "initial_temperature",
            "contrastive_temperature", "contrastive_max_queries",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not value > 0:
                raise ValueError(f"--{name} must be > 0, got {value!r}.")
        if not 0 <= self.contrastive_item_mask_prob < 1:
            raise ValueError(f"--contrastive_item_mask_prob must be in [0, 1), got {self.contrastive_item_mask_prob!r}.")
        for name in ("same_time_shuffle_prob", "contrastive_same_time_shuffle_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name} must be in [0, 1], got {getattr(self, name)!r}.")
        # True/False (Python, YAML) or 'true'/'false' (a flag) become a bool; 'auto' stays until `resolve_full_softmax`.
        value = str(self.full_softmax).lower()
        if value not in ("true", "false", "auto"):
            raise ValueError(f"--full_softmax must be 'true', 'false' or 'auto', got {self.full_softmax!r}.")
        self.full_softmax = value == "true" if value != "auto" else "auto"
        if self.negative_sampling not in ("uniform", "popularity"):
            raise ValueError(f"--negative_sampling must be 'uniform' or 'popularity', got {self.negative_sampling!r}.")

    def resolve_full_softmax(self, num_item_ids: int, max_items: int) -> bool:
        """Settle `full_softmax='auto'`: every item when there are at most `max_items` ids, else sampled negatives."""
        if self.full_softmax == "auto":
            self.full_softmax = num_item_ids <= max_items
        return self.full_softmax

    @property
    def weights(self) -> dict[str, float]:
        return {name: getattr(self, f"{name}_loss_weight") for name in LOSS_NAMES}

    def weighted_sum(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss: each loss of `next_item_losses` (and `contrastive`) times its weight."""
        return sum(self.weights[name] * value for name, value in losses.items())


def offset_pairs(
    valid_query: torch.BoolTensor, target: torch.BoolTensor, offsets: range, sequence_ids: Optional[torch.LongTensor] = None
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """
    Flat `(query, target)` index pairs into `(B, T)` where the target sits `offset` events after a valid query, in
    the same sequence (`sequence_ids` `(B, T)` for packed rows). Ordered by offset, then row-major: packed rows of
    sequences in the same order as one per row give the same pairs in the same order.
    """
    B, T = target.shape
    query_index, target_index = [], []
    flat = torch.arange(B * T, device=target.device).view(B, T)
    for offset in offsets:
        if offset >= T:
            break
        ok = valid_query[:, :-offset] & target[:, offset:]  # (B, T - offset)
        if sequence_ids is not None:
            ok &= sequence_ids[:, :-offset] == sequence_ids[:, offset:]
        query_index.append(flat[:, :-offset][ok])
        target_index.append(flat[:, offset:][ok])
    if not query_index:
        empty = torch.zeros(0, dtype=torch.long, device=target.device)
        return empty, empty
    return torch.cat(query_index), torch.cat(target_index)


def packed_sequence_ids(position_ids: Optional[torch.LongTensor]) -> Optional[torch.LongTensor]:
    """Which sequence of its row each position belongs to (`(B, T)`, from 1) in packed rows; None for one per row."""
    return None if position_ids is None else (position_ids == 0).long().cumsum(dim=1)


def next_item_losses(
    query: torch.Tensor,
    labels: torch.LongTensor,
    attention_mask: Optional[torch.Tensor],
    *,
    position_ids: Optional[torch.LongTensor] = None,
    objective: PretrainingObjective,
    item_embeddings: Callable[[torch.LongTensor], torch.Tensor],
    temperature: torch.Tensor,
    item_log_probs: Optional[torch.Tensor],
    num_special_tokens: int,
    vocab_size: int,
    sampling_cdf: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """
    PinFM's pretraining losses (unweighted), each the mean over its `(query position, target event)` pairs:
    next-token (offset 1), multi-token (offsets 1..L') and future-token (from the end of each L_d window, offsets
    1..L'). Negatives are sampled once per batch (uniform or by popularity, plus in-batch targets) with logQ correction
    and accidental-hit masking; `objective.full_softmax` scores every item instead.

    Args:
        query (`torch.Tensor` of shape `(B, T, P)`): L2-normalised query embedding of every position.
        labels (`torch.LongTensor` of shape `(B, T)`): item id of every event, -100 where it is not a target.
        attention_mask (`torch.Tensor` of shape `(B, T)`, *optional*): 1 at real events (queries); defaults to `labels != -100`.
        position_ids (`torch.LongTensor` of shape `(B, T)`, *optional*): packed rows, 0 where each sequence starts
            (pairs stay within a sequence, windows count its events); None: one sequence per row.
        objective (`PretrainingObjective`): which losses, which negatives.
        item_embeddings (`Callable`): item ids `(...)` -> L2-normalised scoring embeddings `(..., P)`.
        temperature (0-d `torch.Tensor`): the (learnable) softmax temperature.
        item_log_probs (`torch.Tensor` of shape `(V,)`, *optional*): log popularity of every id (None: unknown).
        num_special_tokens (`int`): ids below it are never items; vocab_size (`int`): the item vocabulary size.
        sampling_cdf (`torch.Tensor`, *optional*): `popularity_cdf(item_log_probs, num_special_tokens)`, cached by the
            caller (popularity negatives then cost O(R log V); without it, `item_log_probs` is swept at every call).
    """
    B, T, _ = query.shape
    valid_query = (labels != -100 if attention_mask is None else attention_mask).bool()  # (B, T)
    target = labels != -100  # (B, T)
    targets = labels.clamp(min=0)

    sequence_ids = packed_sequence_ids(position_ids)
    window = range(1, objective.multi_token_window + 1)
    pairs = {}
    if objective.next_token_loss_weight > 0:
        pairs["next_token"] = offset_pairs(valid_query, target, range(1, 2), sequence_ids)
    if objective.multi_token_loss_weight > 0:
        pairs["multi_token"] = offset_pairs(valid_query, target, window, sequence_ids)
    if objective.future_token_loss_weight > 0:
        # Query only at the ends of consecutive length-L_d windows: the model sees L_d events and predicts the
        # targets among the L' events after them, as when a cached sequence serves later requests.
        positions = torch.arange(T, device=query.device) if position_ids is None else position_ids
        window_end = (positions + 1) % objective.future_token_input_length == 0
        pairs["future_token"] = offset_pairs(valid_query & window_end, target, window, sequence_ids)

    flat_query = query.reshape(B * T, -1)  # (B*T, P)
    flat_targets = targets.reshape(B * T)
    if objective.full_softmax == "auto":
        raise ValueError("`objective.full_softmax` is 'auto': settle it with `objective.resolve_full_softmax(...)` first.")
    if objective.full_softmax:
        return _full_softmax_losses(flat_query, flat_targets, pairs, item_embeddings, temperature, num_special_tokens, vocab_size)
    num_items = vocab_size - num_special_tokens

    def log_q(item_ids: torch.LongTensor) -> torch.Tensor:
        # Log probability that `item_ids` are drawn as negatives: popularity when known, else uniform.
        if item_log_probs is not None:
            return item_log_probs[item_ids]
        return torch.full(item_ids.shape, -math.log(num_items), device=item_ids.device)

    max_pairs = max(int(valid_query.sum()), 1)
    negatives = None
    losses = {}
    for name, (query_index, target_index) in pairs.items():
        if query_index.numel() > max_pairs:
            # Bound the multi-token work to one pair per real position on average (uniform subsample).
            keep = torch.randperm(query_index.numel(), device=query.device)[:max_pairs]
            query_index, target_index = query_index[keep], target_index[keep]
        if query_index.numel() == 0:
            losses[name] = query.sum() * 0.0  # zero-safe: no target in range, yet gradients still flow
            continue
        row_target = flat_targets[target_index]  # (N,)
        if negatives is None:
            negatives = _shared_negatives(
                flat_targets[target.reshape(-1)], objective, item_log_probs, log_q, num_special_tokens, vocab_size,
                sampling_cdf,
            )
        neg_ids, neg_log_q = negatives
        per_row = sampled_softmax_loss(
            flat_query[query_index],
            item_embeddings(row_target),
            item_embeddings(neg_ids),
            temperature=temperature,
            pos_ids=row_target,
            neg_ids=neg_ids,
            pos_log_q=log_q(row_target) if objective.use_log_q_correction else None,
            neg_log_q=neg_log_q if objective.use_log_q_correction else None,
        )
        losses[name] = per_row.mean()
    return losses


def next_token_contrastive_loss(
    query: torch.Tensor,
    second_query: torch.Tensor,
    labels: torch.LongTensor,
    attention_mask: Optional[torch.Tensor],
    *,
    position_ids: Optional[torch.LongTensor] = None,
    objective: PretrainingObjective,
) -> torch.Tensor:
    """
    [`contrastive_loss`] over the next-token queries of a batch (those of `next_item_losses`' next-token loss, at
    most `objective.contrastive_max_queries` of them): `query` and `second_query` `(B, T, P)` are two dropout passes
    over the same inputs; `labels`, `attention_mask` and `position_ids` as in [`next_item_losses`].
    """
    valid_query = (labels != -100 if attention_mask is None else attention_mask).bool()
    sequence_ids = packed_sequence_ids(position_ids)
    query_index, target_index = offset_pairs(valid_query, labels != -100, range(1, 2), sequence_ids)
    if query_index.numel() > objective.contrastive_max_queries:
        keep = torch.randperm(query_index.numel(), device=query.device)[: objective.contrastive_max_queries]
        query_index, target_index = query_index[keep], target_index[keep]
    P = query.shape[-1]
    return contrastive_loss(
        query.reshape(-1, P)[query_index], second_query.reshape(-1, P)[query_index], labels.reshape(-1)[target_index],
        temperature=objective.contrastive_temperature,
    )


def _shared_negatives(
    batch_target_ids: torch.LongTensor,
    objective: PretrainingObjective,
    item_log_probs: Optional[torch.Tensor],
    log_q: Callable[[torch.LongTensor], torch.Tensor],
    num_special_tokens: int,
    vocab_size: int,
    sampling_cdf: Optional[torch.Tensor] = None,
) -> tuple[torch.LongTensor, torch.Tensor]:
    """Negatives shared by the batch: sampled from the vocabulary, plus the batch's target items (popularity-distributed)."""
    device = batch_target_ids.device
    if objective.negative_sampling == "popularity":
        if item_log_probs is None:
            raise ValueError("`negative_sampling='popularity'` needs item counts: call `model.set_item_counts(...)`.")
        if sampling_cdf is None:
            sampling_cdf = popularity_cdf(item_log_probs, num_special_tokens)
        neg_ids, neg_log_q = sample_negatives(
            objective.num_negatives, cdf=sampling_cdf, first_id=num_special_tokens, device=device
        )
    else:
        neg_ids, neg_log_q = sample_negatives(
            objective.num_negatives, vocab_size=vocab_size, first_id=num_special_tokens, device=device
        )
    if objective.use_in_batch_negatives and batch_target_ids.numel() > 0:
        in_batch = batch_target_ids.unique()
        # At most `num_negatives` of them: every unique item of a large batch costs as much as a full softmax.
        in_batch = in_batch[torch.randperm(in_batch.numel(), device=device)[: objective.num_negatives]]
        neg_ids = torch.cat([neg_ids, in_batch])
        neg_log_q = torch.cat([neg_log_q, log_q(in_batch)])
    return neg_ids, neg_log_q


def _full_softmax_losses(
    flat_query: torch.Tensor,
    flat_targets: torch.LongTensor,
    pairs: dict[str, tuple[torch.LongTensor, torch.LongTensor]],
    item_embeddings: Callable[[torch.LongTensor], torch.Tensor],
    temperature: torch.Tensor,
    num_special_tokens: int,
    vocab_size: int,
) -> dict[str, torch.Tensor]:
    """
    Cross-entropy over every item for each loss's `(query, target)` pairs. A query's logits do not depend on its
    target, so each query position is scored once and its log-partition shared by all its pairs in all losses: the
    multi-token and future-token losses then cost a gather, not another `(N, V)` softmax.
    """
    # Zero-safe: a loss with no target in range is 0, yet gradients still flow.
    losses = {name: flat_query.sum() * 0.0 for name, (query_index, _) in pairs.items() if query_index.numel() == 0}
    pairs = {name: pair for name, pair in pairs.items() if name not in losses}
    if not pairs:
        return losses
    first = num_special_tokens
    item_emb = item_embeddings(torch.arange(first, vocab_size, device=flat_query.device))
    queries = torch.unique(torch.cat([query_index for query_index, _ in pairs.values()]))  # sorted
    log_partition = scores_logsumexp(flat_query[queries] / temperature, item_emb)  # (N,)
    for name, (query_index, target_index) in pairs.items():
        # The target's logit as a dot product: the (N, V) logits only ever exist a block at a time, in scores_logsumexp.
        target_emb = item_emb[flat_targets[target_index] - first]  # (M, P)
        target_logit = ((flat_query[query_index] / temperature) * target_emb).sum(-1).float()
        losses[name] = (log_partition[torch.searchsorted(queries, query_index)] - target_logit).mean()
    return losses
