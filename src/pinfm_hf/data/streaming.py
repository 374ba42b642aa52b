"""
Training batches streamed from encoded shards on disk ([`TrainShards`] -> [`StreamingBatches`]), for logs larger than
memory: each process reads its own shards through a `datasets` streaming `IterableDataset` with a bounded shuffle
buffer, and cuts what it reads into the same number of batches as every other process.

Why the shards are assigned here rather than by `datasets.distributed.split_dataset_by_node`: every process must take
the same number of optimizer steps per epoch (DDP waits for all of them), so each process cuts its stream at multiples
of *its* token total, which it must know before it reads. `split_dataset_by_node` assigns shards after its own
per-epoch shuffle of the shard order, so that total is not known in advance; here the epoch's shard order is a
permutation drawn from `seed + epoch` and process `i` of `n` takes shards `i, i + n, ...` of it (the rule of
`split_dataset_by_node`'s "shards" strategy), whose rows and tokens `TrainShards` lists.

Why resuming replays the epoch rather than loading `IterableDataset.state_dict()`: the state of a shuffled stream does
not hold the shuffle buffer, so a resumed stream drops the examples that were in it (the `datasets` docs say so). The
stream is a function of the epoch, so reading it again and skipping the batches already trained on gives exactly the
uninterrupted run's batches; it costs reading, not training.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from torch.utils.data import DataLoader, IterableDataset


SHARDS_FILE = "shards.json"


@dataclass(frozen=True)
class TrainShards:
    """
    A folder of encoded training rows in Arrow stream files (`shard-00000.arrow`, ...) and their `shards.json`: the
    file names, rows and events (tokens) of each shard, in the order they were written.
    """

    folder: str
    files: tuple[str, ...]
    rows: tuple[int, ...]
    tokens: tuple[int, ...]

    @classmethod
    def load(cls, folder: Union[str, Path]) -> "TrainShards":
        meta = json.loads((Path(folder) / SHARDS_FILE).read_text())
        return cls(str(folder), tuple(meta["files"]), tuple(meta["rows"]), tuple(meta["tokens"]))

    @staticmethod
    def write_index(folder: Path, files: list[str], rows: list[int], tokens: list[int]) -> None:
        (folder / SHARDS_FILE).write_text(json.dumps({"files": files, "rows": rows, "tokens": tokens}))

    @property
    def num_rows(self) -> int:
        return sum(self.rows)

    @property
    def num_tokens(self) -> int:
        return sum(self.tokens)

    def assignment(self, epoch: int, seed: int, num_processes: int, process_index: int) -> list[int]:
        """The shards (indices) process `process_index` reads in `epoch`, in reading order."""
        order = np.random.default_rng(seed + epoch).permutation(len(self.files))
        return order[process_index::num_processes].tolist()


class StreamingBatches(IterableDataset):
    """
    One process's training batches of an epoch: lists of examples (dicts of lists, as `datasets` yields them) for
    `PinFMDataCollator`, read from the process's shards ([`TrainShards.assignment`]) through a shuffle buffer of
    `buffer_size` examples.

    Every process yields `len(self)` batches per epoch, each holding about `max_tokens` events: the stream is cut where
    its running count of events crosses multiples of (the process's events / `len(self)`), as
    [`TokenBudgetBatchSampler`] cuts an in-memory epoch. `len(self)` is a multiple of `multiple_of` (the gradient
    accumulation steps, so that an epoch ends on an optimizer step) and at most the rows any process can get, so every
    batch holds a row. Each row is in exactly one batch of one process per epoch.

    Args:
        shards (`TrainShards`): the encoded training rows.
        max_tokens (`int`): events per batch, on average over all processes.
        seed (`int`): draws the shard order and the shuffle buffer of each epoch (`seed + epoch`).
        buffer_size (`int`): examples held in the shuffle buffer (memory is bounded by it, not by the data).
        num_processes, process_index (`int`): this process among all.
        multiple_of (`int`, *optional*, defaults to 1): `len(self)` is a multiple of it.
    """

    def __init__(
        self, shards: TrainShards, max_tokens: int, *, seed: int, buffer_size: int, num_processes: int = 1,
        process_index: int = 0, multiple_of: int = 1,
    ):
        if max_tokens < 1:
            raise ValueError(f"`max_tokens` ({max_tokens}) must be a positive integer.")
        if len(shards.files) < num_processes:
            raise ValueError(f"{shards.folder} holds {len(shards.files)} shard(s), fewer than the {num_processes} processes "
                             "that read them: train on fewer processes or encode smaller shards.")
        self.shards, self.seed, self.buffer_size, self.epoch = shards, seed, buffer_size, 0
        self.num_processes, self.process_index = num_processes, process_index
        # The fewest rows a process can get: its share of the shards, the smallest ones.
        fewest_rows = sum(sorted(shards.rows)[: len(shards.files) // num_processes])
        wanted = max(1, -(-shards.num_tokens // (max_tokens * num_processes)))
        wanted = -(-wanted // multiple_of) * multiple_of
        self.num_batches = min(wanted, fewest_rows // multiple_of * multiple_of or fewest_rows)
        if self.num_batches < 1:
            raise ValueError(f"{shards.folder}: too few training rows for {num_processes} processes.")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def examples(self, assigned: list[int]) -> Iterator[dict[str, Any]]:
        """The rows of the `assigned` shards, shuffled through the buffer."""
        import datasets

        files = [str(Path(self.shards.folder) / self.shards.files[i]) for i in assigned]
        stream = datasets.load_dataset("arrow", data_files=files, split="train", streaming=True)
        return iter(stream.shuffle(seed=self.seed + self.epoch, buffer_size=self.buffer_size))

    def _assigned(self) -> list[int]:
        return self.shards.assignment(self.epoch, self.seed, self.num_processes, self.process_index)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        assigned = self._assigned()
        total_rows = sum(self.shards.rows[i] for i in assigned)
        share = sum(self.shards.tokens[i] for i in assigned) / self.num_batches
        batch: list[dict[str, Any]] = []
        seen_rows = seen_tokens = emitted = 0
        for example in self.examples(assigned):
            rows_left = total_rows - seen_rows  # this one included
            batches_after = self.num_batches - emitted - 1  # still to fill once the current batch is closed
            if batch and batches_after > 0 and (seen_tokens >= (emitted + 1) * share or rows_left <= batches_after):
                yield batch
                batch, emitted = [], emitted + 1
            batch.append(example)
            seen_rows += 1
            seen_tokens += len(example["input_ids"])
        if seen_rows != total_rows:
            raise RuntimeError(f"{self.shards.folder}: read {seen_rows} rows of shards {assigned}, expected {total_rows}: "
                               "the shards changed after they were indexed; delete the folder to encode them again.")
        yield batch


class StreamingDataLoader(DataLoader):
    """A `DataLoader` of [`StreamingBatches`] (each item a whole batch, collated by `collate_fn`), with the `set_epoch`
    that the training loop calls on every loader. Not for `accelerator.prepare`: each process already reads its own."""

    def __init__(self, dataset: StreamingBatches, collate_fn):
        super().__init__(dataset, batch_size=None, collate_fn=collate_fn)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


__all__ = ["StreamingBatches", "StreamingDataLoader", "TrainShards"]
