"""
`SameTargetPositives`: DuoRec's supervised positives. For a target event of a batch, the prefix of a training
sequence (any user's) that ends right before another event of the same item: two histories followed by the same next
item are views of one intent, which the contrastive loss pulls together.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Optional

import numpy as np
import pyarrow as pa
import torch


class SameTargetPositives:
    """
    A pool of (prefix, next item) pairs over the training sequences, sampled by next item.

    Args:
        table (`pyarrow.Table`):
            The training rows, one list per sequence key (`input_ids`, and `action_ids`, `timestamps`, ... when the
            model reads them), as `PinFMTokenizer.encode_sequences` gives them.
        keys (`Sequence[str]`):
            The sequence keys a prefix carries (those the collator batches).
        positive_action_ids (`Sequence[int]`, *optional*):
            Only events with one of these actions are targets (as `PinFMDataCollator`'s); `None`: every event.
        max_length (`int`, *optional*, defaults to 50):
            Keep at most this many events of a prefix (its most recent ones): a positive costs an encoder pass over it.
    """

    def __init__(
        self,
        table: pa.Table,
        keys: Sequence[str],
        positive_action_ids: Optional[Sequence[int]] = None,
        max_length: int = 50,
    ):
        if max_length < 1:
            raise ValueError(f"`max_length` ({max_length}) must be a positive integer.")
        missing = [key for key in ("input_ids", *keys) if key not in table.column_names]
        if missing:
            raise ValueError(f"The training table has no column {missing[0]!r} (it has {table.column_names}).")
        self.keys, self.max_length = list(dict.fromkeys(("input_ids", *keys))), max_length
        lists = {key: table.column(key).combine_chunks() for key in self.keys}
        self.offsets = lists["input_ids"].offsets.to_numpy().astype(np.int64)
        self.values = {key: lists[key].flatten().to_numpy(zero_copy_only=False).astype(np.int64) for key in self.keys}
        # Candidate targets: every event but the first of its row (a target needs a history), of a positive action.
        is_target = np.ones(len(self.values["input_ids"]), dtype=bool)
        is_target[self.offsets[:-1][np.diff(self.offsets) > 0]] = False
        if positive_action_ids is not None:
            if "action_ids" not in self.values:
                raise ValueError("`positive_action_ids` selects targets by action: `keys` needs `action_ids`.")
            is_target &= np.isin(self.values["action_ids"], np.asarray(list(positive_action_ids), dtype=np.int64))
        events = np.flatnonzero(is_target)
        items = self.values["input_ids"][events]
        order = np.argsort(items, kind="stable")
        self._events, self._items = events[order], items[order]  # candidate events grouped by item

    @property
    def num_targets(self) -> int:
        return len(self._events)

    def sample(self, target_ids: np.ndarray, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
        """
        One prefix per target item of `target_ids`: a uniform draw among the training events of that item (the query's
        own prefix included, when it is one of them: that positive is then the dropout view). An item that is never a
        training target (only in held-out events) gets no positive: raises, since the batch's targets come from the
        same training rows.
        """
        target_ids = np.asarray(target_ids, dtype=np.int64)
        start = np.searchsorted(self._items, target_ids, side="left")
        count = np.searchsorted(self._items, target_ids, side="right") - start
        if (count == 0).any():
            item = int(target_ids[np.argmax(count == 0)])
            raise ValueError(f"Item id {item} is a target of the batch but never one of the training rows given to the pool.")
        events = self._events[start + (rng.random(len(target_ids)) * count).astype(np.int64)]
        rows = np.searchsorted(self.offsets, events, side="right") - 1
        begins = np.maximum(self.offsets[rows], events - self.max_length)
        return [{key: self.values[key][b:e] for key in self.keys} for b, e in zip(begins, events)]


def batch_rng(input_ids: torch.Tensor) -> np.random.Generator:
    """A generator seeded by the batch's content: the same batch draws the same positives, so a resumed run repeats them."""
    return np.random.default_rng(zlib.crc32(input_ids.numpy().tobytes()))
