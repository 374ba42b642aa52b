"""`PinFMDataCollator`: pads (or packs) and truncates tokenised event sequences into a batch of tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch


# Keys holding one value per event; they are truncated and padded together.
SEQUENCE_KEYS = ("input_ids", "action_ids", "surface_ids", "timestamps", "attention_mask", "labels")
IGNORE_INDEX = -100


@dataclass
class PinFMDataCollator:
    """
    Pad a list of tokenised sequences to the batch's longest one, as `int64` tensors; or, with `pack_length`, pack
    them into rows of several sequences each.

    Args:
        pad_token_id (`int`, *optional*, defaults to 0):
            Value used to pad `input_ids`; `action_ids`, `surface_ids`, `timestamps` and `attention_mask` are
            padded with 0, a given `labels` sequence with -100.
        padding_side (`str`, *optional*, defaults to `"right"`):
            `"right"` or `"left"`: where the padding goes.
        max_length (`int`, *optional*):
            Keep at most this many events per sequence, the most recent ones (the tail).
        return_labels (`bool`, *optional*, defaults to `False`):
            Add `labels`: a copy of `input_ids` with -100 at padded positions.
        positive_action_ids (`Sequence[int]`, *optional*):
            With `return_labels`: only events with one of these action ids are targets (the others get -100 in
            `labels`, and stay in the input); `None` makes every event a target.
        pack_length (`int`, *optional*):
            Pack the sequences, in order, into rows of at most this many events (a sequence goes to the current row
            if it fits, else starts the next one), with `position_ids` restarting at 0 at each sequence and padding
            only at the end of each row: for short histories, most of a padded batch is padding, which the model
            computes on. [`PinFMModel`] keeps attention, positions and time features within each sequence, so the
            outputs are those of the padded batch. Every sequence must fit (`max_length <= pack_length`) and hold an
            event. `transformers.DataCollatorWithFlattening` does the same for language models, in one row.
        pack_first_fit (`bool`, *optional*, defaults to `False`):
            With `pack_length`: place the sequences longest first, each in the first row with room (first-fit
            decreasing) instead of in order: fewer rows when sequences are long (ML-1M's windows fill ~77% of their
            rows in order, ~97% this way), the same (query, target) pairs. The examples are reordered, so for
            training batches only: outputs per sequence and stacked keys then follow the new order, not the input's.

    Keys other than the sequence keys (`target_ids`, `label`, ...) are stacked as they are (float64 becomes
    float32); string values (such as `user_id`) are left out, as `transformers.default_data_collator` does.
    """

    pad_token_id: int = 0
    padding_side: str = "right"
    max_length: Optional[int] = None
    return_labels: bool = False
    positive_action_ids: Optional[Sequence[int]] = None
    pack_length: Optional[int] = None
    pack_first_fit: bool = False

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"`padding_side` ({self.padding_side!r}) must be 'left' or 'right'.")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"`max_length` ({self.max_length}) must be a positive integer or None.")
        if self.pack_length is not None:
            if self.pack_length < 1:
                raise ValueError(f"`pack_length` ({self.pack_length}) must be a positive integer or None.")
            if self.max_length is not None and self.max_length > self.pack_length:
                raise ValueError(
                    f"`max_length` ({self.max_length}) must be at most `pack_length` ({self.pack_length}): a sequence "
                    "is never split across packed rows."
                )

    def _sequences(self, features: Sequence[dict[str, Any]]) -> tuple[list[str], list[dict[str, np.ndarray]]]:
        keys = [k for k in SEQUENCE_KEYS if k in features[0]]
        if "input_ids" not in keys:
            raise ValueError(f"Every example needs `input_ids`; example 0 has keys {sorted(features[0])}.")
        rows = []
        for index, feature in enumerate(features):
            row = {}
            for key in keys:
                if key not in feature:
                    raise ValueError(f"Example {index} has no `{key}`, but example 0 has it.")
                row[key] = np.asarray(feature[key], dtype=np.int64).reshape(-1)
            lengths = {key: len(values) for key, values in row.items()}
            if len(set(lengths.values())) > 1:
                raise ValueError(
                    f"Example {index}: sequence keys have different lengths: "
                    + ", ".join(f"`{k}` {n}" for k, n in lengths.items())
                )
            if self.max_length is not None:
                row = {key: values[-self.max_length :] for key, values in row.items()}
            rows.append(row)
        return keys, rows

    def _packs(self, lengths: list[int]) -> list[list[int]]:
        """Which examples go in each packed row: in order (next fit), or longest first into the first row with room."""
        for index, n in enumerate(lengths):
            if n == 0:
                raise ValueError(f"Example {index} has no events: a packed batch cannot hold an empty sequence.")
            if n > self.pack_length:
                raise ValueError(
                    f"Example {index} has {n} events, more than `pack_length` ({self.pack_length}): set `max_length` "
                    "to keep the most recent events, or pack into longer rows."
                )
        packs: list[list[int]] = []
        fills: list[int] = []
        if self.pack_first_fit:
            for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep their order
                row = next((r for r, fill in enumerate(fills) if fill + lengths[index] <= self.pack_length), len(packs))
                if row == len(packs):
                    packs.append([])
                    fills.append(0)
                packs[row].append(index)
                fills[row] += lengths[index]
            return [sorted(pack) for pack in packs]
        for index, n in enumerate(lengths):
            if not fills or fills[-1] + n > self.pack_length:
                packs.append([])
                fills.append(0)
            packs[-1].append(index)
            fills[-1] += n
        return packs

    @staticmethod
    def _pack(rows: list[dict[str, np.ndarray]], lengths: list[int], packs: list[list[int]]) -> list[dict[str, np.ndarray]]:
        """Concatenate the sequences of each pack into one row, with `position_ids` restarting at each sequence."""
        keys = list(rows[0])
        return [
            {
                **{key: np.concatenate([rows[i][key] for i in pack]) for key in keys},
                "position_ids": np.concatenate([np.arange(lengths[i], dtype=np.int64) for i in pack]),
            }
            for pack in packs
        ]

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if len(features) == 0:
            raise ValueError("Cannot collate an empty list of examples.")
        keys, rows = self._sequences(features)
        lengths = [len(row["input_ids"]) for row in rows]
        if "attention_mask" not in keys:
            keys.append("attention_mask")
            for row, n in zip(rows, lengths):
                row["attention_mask"] = np.ones(n, dtype=np.int64)
        if self.pack_length is not None:
            packs = self._packs(lengths)
            if self.pack_first_fit:  # stacked keys follow the sequences in their packed order
                features = [features[i] for pack in packs for i in pack]
            rows = self._pack(rows, lengths, packs)
            keys.append("position_ids")
            lengths = [len(row["input_ids"]) for row in rows]
        width = max(lengths)
        pad_values = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}
        batch = {}
        for key in keys:
            padded = np.full((len(rows), width), pad_values.get(key, 0), dtype=np.int64)
            for i, (row, n) in enumerate(zip(rows, lengths)):
                if self.padding_side == "right" or self.pack_length is not None:
                    padded[i, :n] = row[key]
                else:
                    padded[i, width - n :] = row[key]
            batch[key] = torch.from_numpy(padded)
        if self.return_labels and "labels" not in batch:
            target = batch["attention_mask"] != 0
            if self.positive_action_ids:
                if "action_ids" not in batch:
                    raise ValueError("`positive_action_ids` selects targets by action: the examples need `action_ids`.")
                target &= torch.isin(batch["action_ids"], torch.tensor(list(self.positive_action_ids)))
            batch["labels"] = batch["input_ids"].masked_fill(~target, IGNORE_INDEX)

        for key in features[0]:
            if key in batch or key in SEQUENCE_KEYS:
                continue
            values = [feature.get(key) for feature in features]
            if any(isinstance(v, str) for v in values):
                continue
            try:
                stacked = np.asarray([np.asarray(v) for v in values])
                # float64 -> float32 like torch's default dtype (CTR labels meet float32 logits).
                batch[key] = torch.as_tensor(stacked.astype(np.float32) if stacked.dtype == np.float64 else stacked)
            except (ValueError, TypeError) as e:
                raise ValueError(f"Cannot stack `{key}` across the batch (ragged or non-numeric values): {e}") from e
        return batch
