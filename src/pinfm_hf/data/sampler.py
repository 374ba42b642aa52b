"""
Batch samplers of the training sequences: [`LengthGroupedEpochSampler`] (padded batches of sequences of similar
length) and [`TokenBudgetBatchSampler`] (random users up to a number of events, for packed rows).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, Sampler
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices


class LengthGroupedEpochSampler(LengthGroupedSampler):
    """
    Transformers' `LengthGroupedSampler` (random mega-batches, sorted by length inside), made resumable and
    unbiased in order:

    - each epoch's order is drawn from `seed + epoch` alone (call `set_epoch`, as Accelerate's data loaders do), so
      a resumed run repeats it and every process draws the same one;
    - whole batches are shuffled, so that training does not run from the longest batch to the shortest within each
      mega-batch; the one short batch, if any, stays last, so that the data loader cuts the same batches.

    On ML-1M with 200-event windows a random batch is 42% padding, a grouped one 3-6% (`benchmarks/bench_batching.py`).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"`batch_size` ({batch_size}) must be a positive integer.")
        super().__init__(batch_size, lengths=list(lengths))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        indices = get_length_grouped_indices(self.lengths, self.batch_size, generator=generator)
        batches = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        num_full = len(indices) // self.batch_size
        order = torch.randperm(num_full, generator=generator).tolist() + list(range(num_full, len(batches)))
        return iter([i for b in order for i in batches[b]])


class EpochRandomSampler(Sampler[int]):
    """A random permutation of `range(num_samples)` drawn from `seed + epoch` alone (`set_epoch`): resumable, and
    the same on every process."""

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.num_samples


class TokenBudgetBatchSampler(BatchSampler):
    """
    Batches of random users holding about `max_tokens` events each, for packed rows (`PinFMDataCollator(pack_length=...)`):
    the same mixing as random batches of a fixed number of users, but a fixed amount of work per step, however short
    the histories.

    The users come in the order of `sampler` (an [`EpochRandomSampler`]: Accelerate calls its `set_epoch`); the order
    is cut where the running count of events crosses multiples of `total / num_batches`, so every epoch has the same
    `len(self)` batches (the learning-rate schedule needs it) of `max_tokens` events or fewer on average, each with at
    least one user. `num_batches` is a multiple of `num_processes`, so that Accelerate's per-process shards are equal
    and no user is seen twice in an epoch.

    Args:
        sampler (`Sampler[int]`): the order of the examples.
        lengths (`Sequence[int]`): events of each example as the collator will keep them (after `max_length`).
        max_tokens (`int`): events per batch, on average.
        num_processes (`int`, *optional*, defaults to 1): processes the batches are sharded over.
    """

    def __init__(self, sampler: Sampler[int], lengths: Sequence[int], max_tokens: int, num_processes: int = 1):
        if max_tokens < 1:
            raise ValueError(f"`max_tokens` ({max_tokens}) must be a positive integer.")
        if len(lengths) < num_processes:
            raise ValueError(f"{len(lengths)} examples cannot give each of {num_processes} processes a batch.")
        self.sampler, self.max_tokens, self.num_processes = sampler, max_tokens, num_processes
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = None  # batches vary in size: Accelerate shards them whole
        self.drop_last = False
        num_batches = max(1, -(-int(self.lengths.sum()) // max_tokens))
        num_batches = -(-num_batches // num_processes) * num_processes
        self.num_batches = min(num_batches, len(lengths) // num_processes * num_processes)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        order = np.fromiter(iter(self.sampler), dtype=np.int64, count=len(self.lengths))
        starts = np.cumsum(self.lengths[order]) - self.lengths[order]  # events before each example
        targets = np.arange(1, self.num_batches) * (starts[-1] + self.lengths[order[-1]]) / self.num_batches
        cuts = np.searchsorted(starts, targets, side="left")
        # At least one example per batch (a very long example can span two cut points).
        for i in range(len(cuts)):
            low = (cuts[i - 1] if i else 0) + 1
            high = len(order) - (len(cuts) - i)
            cuts[i] = min(max(cuts[i], low), high)
        for batch in np.split(order, cuts):
            yield batch.tolist()
