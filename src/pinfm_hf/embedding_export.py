"""User and item embeddings of a pretrained PinFM model, for a retrieval (nearest-neighbour) index.

Both are the L2-normalised scoring projections of [`PinFMForPretraining`], so
`score(user, item) = dot(user_embedding, item_embedding) / model.temperature` is the logit that `model.score_items`
gives and the recommendation pipeline ranks by. The temperature is one positive number: an inner-product (or cosine)
index ranks items the same with or without it.
"""

from __future__ import annotations

from typing import Any, Union

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm

from .data.collator import PinFMDataCollator
from .tokenization_pinfm import check_tokenizer_matches_model


def _check_pair(model, tokenizer) -> None:
    if not hasattr(model, "next_item_query"):
        raise TypeError(f"{type(model).__name__} has no scoring head: export from a PinFMForPretraining checkpoint.")
    check_tokenizer_matches_model(tokenizer, model.config)


def _embedding_table(keys_name: str, keys: Any, embeddings: np.ndarray) -> datasets.Dataset:
    """`(keys_name, embedding)` with a fixed-size float32 list column, the layout vector indexes read."""
    dim = embeddings.shape[1]
    column = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.astype(np.float32).reshape(-1)), dim)
    return datasets.Dataset(pa.table({keys_name: keys, "embedding": column}))


@torch.no_grad()
def export_item_embeddings(model, tokenizer, batch_size: int = 65536, show_progress: bool = False) -> datasets.Dataset:
    """
    Scoring embedding of every real item of the vocabulary: item token ids `[num_special, tokenizer.first_bucket_id)`
    (special tokens and hash buckets are not items).

    Args:
        model ([`PinFMForPretraining`]): the model whose `item_embeddings` are exported.
        tokenizer ([`PinFMTokenizer`]): its tokenizer (maps token ids back to raw item ids).
        batch_size (`int`, *optional*, defaults to 65536): item ids embedded per step.
        show_progress (`bool`, *optional*, defaults to `False`): show a progress bar.

    Returns:
        `datasets.Dataset` with `item_id` (`str`, the raw id) and `embedding` (`float32`, `projection_size` values,
        L2-normalised), in token-id order.
    """
    _check_pair(model, tokenizer)
    first, end = model.config.num_special_item_tokens, tokenizer.first_bucket_id
    if end <= first:
        raise ValueError("The tokenizer keeps no item (a vocabulary-free model): item embeddings are exported per item of "
                         "a vocabulary; exporting a vocabulary-free model's catalogue is not supported yet.")
    device = next(model.parameters()).device
    chunks = []
    for start in tqdm(range(first, end, batch_size), desc="item embeddings", disable=not show_progress):
        ids = torch.arange(start, min(start + batch_size, end), device=device)
        chunks.append(model.item_embeddings(ids).float().cpu().numpy())
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, model.config.projection_size), dtype=np.float32)
    return _embedding_table("item_id", tokenizer.item_tokens[first:end], embeddings)


@torch.no_grad()
def export_user_embeddings(
    model,
    tokenizer,
    sequences: Union[datasets.Dataset, pa.Table],
    batch_size: int = 256,
    show_progress: bool = False,
    packing: bool = True,
) -> datasets.Dataset:
    """
    Query embedding of each user: the model's normalised scoring projection at the last event of the user's history
    (its `tokenizer.model_max_length` most recent events, the window the model was trained on). The users of a step
    are packed into rows as long as the longest history (no compute on padding; the same embeddings as padded rows, to float rounding).

    Args:
        model ([`PinFMForPretraining`]): the model.
        tokenizer ([`PinFMTokenizer`]): its tokenizer.
        sequences (`datasets.Dataset` or `pyarrow.Table`):
            Per-user time-ordered histories from [`~pinfm_hf.data.build_user_sequences`]: `user_id` and list columns
            `item_ids`, `actions`, `timestamps` (and `surfaces`). Pass the full sequences, not a training split, for
            embeddings of the users' present state.
        batch_size (`int`, *optional*, defaults to 256): users encoded per forward pass.
        show_progress (`bool`, *optional*, defaults to `False`): show a progress bar.
        packing (`bool`, *optional*, defaults to `True`): pack the users of a step into rows; False pads one per row.

    Returns:
        `datasets.Dataset` with `user_id` and `embedding` (`float32`, `projection_size` values, L2-normalised), in the
        order of `sequences`.
    """
    _check_pair(model, tokenizer)
    table = sequences.with_format("arrow")[:] if isinstance(sequences, datasets.Dataset) else sequences
    encoded = tokenizer.encode_sequences(table)
    longest = pc.max(pc.list_value_length(encoded.column("input_ids"))).as_py() or 1  # <= model_max_length
    collator = PinFMDataCollator(pad_token_id=tokenizer.pad_token_id, pack_length=longest if packing else None)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunks = []
    progress = tqdm(total=encoded.num_rows, desc="user embeddings", unit="user", disable=not show_progress)
    for start in range(0, encoded.num_rows, batch_size):
        batch = collator(encoded.slice(start, batch_size).to_pylist())
        batch = {key: value.to(device) for key, value in batch.items()}
        query = model.next_item_query(**batch)  # (B, P)
        chunks.append(query.float().cpu().numpy())
        progress.update(len(query))
    progress.close()
    model.train(was_training)
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, model.config.projection_size), dtype=np.float32)
    return _embedding_table("user_id", table.column("user_id"), embeddings)


__all__ = ["export_item_embeddings", "export_user_embeddings"]
