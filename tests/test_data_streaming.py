"""Streamed training batches (`pinfm_hf.data.streaming`): the in-memory path's rows, each once per epoch over every
process, the same number of batches on each, shuffled, reproducible."""

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pinfm_hf import PinFMTokenizer
from pinfm_hf.data import (
    PinFMDataCollator,
    StreamingBatches,
    StreamingDataLoader,
    TrainShards,
    build_user_sequences,
    leave_last_out_split,
    load_events,
    prepare_events,
)


pytest.importorskip("duckdb")
MAX_LENGTH = 50


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ml1m_events):
    """The first 300 ML-1M users' events, prepared on DuckDB, with the in-memory tokenizer and training rows."""
    folder = tmp_path_factory.mktemp("streaming")
    table = ml1m_events.table.select(["user_id", "item_id", "action", "timestamp"])
    users = pa.array(sorted(set(table["user_id"].to_pylist()))[:300])
    path = folder / "events.parquet"
    pq.write_table(table.filter(pc.is_in(table["user_id"], value_set=users)), path)
    events = load_events(path)
    tokenizer = PinFMTokenizer.from_events(events, model_max_length=MAX_LENGTH)
    train = leave_last_out_split(build_user_sequences(events), train_holdout=2)["train"]
    expected = tokenizer.encode_sequences(train, windows=True)
    encoded = prepare_events(path, folder / "prepared").encoded_splits(
        tokenizer, train_holdout=2, max_length=MAX_LENGTH, windows=True
    )
    return encoded, tokenizer, expected


def _key(example: dict) -> tuple:
    return tuple(example["input_ids"]) + tuple(example["timestamps"])


def _epoch(shards: TrainShards, epoch: int, num_processes: int, **kwargs) -> list[list[list[dict]]]:
    """Every process's batches of `epoch`."""
    streams = [StreamingBatches(shards, 2000, seed=7, buffer_size=100, num_processes=num_processes, process_index=i,
                                **kwargs) for i in range(num_processes)]
    for stream in streams:
        stream.set_epoch(epoch)
    return [list(stream) for stream in streams]


def test_shards_hold_the_in_memory_training_rows(prepared):
    encoded, tokenizer, expected = prepared
    shards = encoded.train
    assert len(shards.files) > 2 and shards.num_rows == expected.num_rows
    read = pa.concat_tables([pa.ipc.open_stream(Path(shards.folder) / f).read_all() for f in shards.files])
    assert read.select(expected.column_names).equals(expected)
    assert [pa.ipc.open_stream(Path(shards.folder) / f).read_all().num_rows for f in shards.files] == list(shards.rows)
    assert shards.num_tokens == pc.sum(pc.list_value_length(expected["input_ids"])).as_py()
    assert encoded.train_item_counts.tolist() == tokenizer.item_counts(expected).tolist()


@pytest.mark.parametrize("num_processes", [1, 2, 3])
def test_every_row_once_per_epoch_over_the_processes_in_equal_numbers_of_batches(prepared, num_processes):
    encoded, _, expected = prepared
    all_rows = Counter(_key(row) for row in expected.to_pylist())
    for epoch in (0, 1):
        batches = _epoch(encoded.train, epoch, num_processes)
        assert {len(b) for b in batches} == {len(StreamingBatches(encoded.train, 2000, seed=7, buffer_size=100,
                                                                  num_processes=num_processes))}
        assert all(batch for process in batches for batch in process)  # no empty batch
        seen = Counter(_key(row) for process in batches for batch in process for row in batch)
        assert seen == all_rows


def test_batches_hold_about_the_token_budget_and_end_on_an_optimizer_step(prepared):
    shards = prepared[0].train
    (batches,) = _epoch(shards, 0, 1, multiple_of=4)
    assert len(batches) % 4 == 0 and len(batches) == -(-(-(-shards.num_tokens // 2000)) // 4) * 4
    tokens = [sum(len(row["input_ids"]) for row in batch) for batch in batches]
    share = shards.num_tokens / len(batches)
    assert all(t <= share + MAX_LENGTH for t in tokens) and min(tokens[:-1]) >= share - MAX_LENGTH


def test_the_stream_is_shuffled_reproducible_and_new_each_epoch(prepared):
    encoded, _, expected = prepared
    order = lambda batches: [_key(row) for batch in batches[0] for row in batch]  # noqa: E731
    first = order(_epoch(encoded.train, 0, 1))
    assert first == order(_epoch(encoded.train, 0, 1))
    assert first != order(_epoch(encoded.train, 1, 1))
    assert first != [_key(row) for row in expected.to_pylist()]  # not the file order


def test_a_loader_collates_whole_batches(prepared):
    encoded, tokenizer, _ = prepared
    stream = StreamingBatches(encoded.train, 2000, seed=7, buffer_size=100)
    loader = StreamingDataLoader(stream, PinFMDataCollator(pad_token_id=tokenizer.pad_token_id, return_labels=True,
                                                           pack_length=MAX_LENGTH))
    loader.set_epoch(3)
    assert stream.epoch == 3 and len(loader) == len(stream)
    batches = list(loader)
    assert len(batches) == len(stream)
    assert sum(int(b["attention_mask"].sum()) for b in batches) == encoded.train.num_tokens


def test_too_few_shards_or_changed_shards_are_clear_errors(prepared, tmp_path):
    shards = prepared[0].train
    with pytest.raises(ValueError, match=f"holds {len(shards.files)} shard"):
        StreamingBatches(shards, 2000, seed=0, buffer_size=10, num_processes=len(shards.files) + 1)
    # A shard rewritten with fewer rows than its index says.
    first = pa.ipc.open_stream(Path(shards.folder) / shards.files[0]).read_all()
    with pa.OSFile(str(tmp_path / shards.files[0]), "wb") as sink, pa.ipc.new_stream(sink, first.schema) as writer:
        writer.write_table(first.slice(1))
    changed = TrainShards(str(tmp_path), shards.files[:1], shards.rows[:1], shards.tokens[:1])
    with pytest.raises(RuntimeError, match="the shards changed after they were indexed"):
        list(StreamingBatches(changed, 2000, seed=0, buffer_size=10))
