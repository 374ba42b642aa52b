"""Out-of-core preparation: event files -> validated, deduplicated, per-user time-ordered sequences as Parquet shards.

The in-memory path (`load_events` -> `build_user_sequences`) holds the whole log in one Arrow table. Logs larger than
memory are prepared here, on an engine the user already runs: DuckDB in this process (out of core, under a
`memory_limit`) or Apache Spark (`local[*]` or a cluster). Both run the same query text (`EVENTS_SQL`,
`DEDUPLICATED_SQL`, `SEQUENCES_SQL`, `ITEM_COUNTS_SQL`); the few expressions on which their SQL differs are in
`DIALECTS`, so that the two cannot drift. The result is the in-memory path's: the same users in the same (string)
order, each user's events ordered by time and, within a second, by file then row (every row gets an explicit order
key), exact duplicates dropped and counted. Leave-last-out splits are a slice of each row ([`prepared_split`]), taken
when the sequences are read; a global time cut (`cut_timestamp`) keeps the events before it. On DuckDB, a log larger
than `memory_limit` allows is cut into user ranges in one partitioned pass, and each range is grouped on its own.
Training reads the result through [`PreparedEvents.encoded_splits`]: the shards encoded a batch of users at a time
into Arrow shards that training streams (`streaming.StreamingBatches`).

Output folder (written atomically: a crash leaves the previous folder or none):
    sequences/part-00000.parquet, ...   user_id, item_ids, actions, timestamps (and surfaces): one row per user
    item_counts.parquet                 item_id, count: for the tokenizer's vocabulary and the items' popularity
    prepared.json                       sources, counts, engine, time cut: read back by `PreparedEvents.load`

What the in-memory path accepts and this one does not (yet): ISO date strings as timestamps, item side-feature
columns, RecBole `.inter` files; convert them to unix times and CSV/Parquet columns first.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from transformers.utils import logging

from ..io_utils import atomic_folder, atomic_write_json
from .events import _UNIT_FACTORS, _UNIT_NAMES, EVENT_COLUMNS, SURFACE_COLUMN, EventValidationError, _unit_of
from .sequences import SEQUENCE_COLUMNS, _drop_last, split_rules
from .streaming import SHARDS_FILE, TrainShards


if TYPE_CHECKING:
    import datasets

    from ..tokenization_pinfm import PinFMTokenizer


logger = logging.get_logger(__name__)

ENGINES = ("duckdb", "spark")
PREPARED_FILE = "prepared.json"
SEQUENCES_DIR = "sequences"
ITEM_COUNTS_FILE = "item_counts.parquet"
ROW_FACTOR = 1 << 40  # event order = file index * 2**40 + row: up to a trillion rows per file
# DuckDB groups at most this many events per GB of --memory_limit at once (measured: 10^7 events fail at 0.4 GB).
EVENTS_PER_GB = 1_500_000
SAMPLED_USERS = 100_000  # rows sampled for the user ranges' boundaries
ENCODE_BATCH_USERS = 20_000  # users encoded at a time for training
# Training shards of a prepared log, about one per TRAIN_SHARDS-th of its users (MIN_SHARD_ROWS to ENCODE_BATCH_USERS
# rows each): the processes share them out, so more shards share more evenly.
TRAIN_SHARDS, MIN_SHARD_ROWS = 64, 256
TOKEN_COUNTS_FILE = "token_counts.npy"
# Rows per record batch of the encoded files, as `datasets` writes them: a random row read maps its batch in memory.
ENCODED_BATCH_ROWS = 1_000


@dataclass(frozen=True)
class Dialect:
    """The expressions on which DuckDB's and Spark's SQL differ; every query around them is shared text."""

    integer_divide: str  # `{a}` divided by `{b}`, rounded down (both non-negative)
    ordered_list: str  # each user's `{value}`s ordered by (timestamp, event_order)
    epoch_seconds: str  # unix seconds of a TIMESTAMP column `{value}`
    parquet_files: str  # a table of the Parquet files in `{folder}`


DIALECTS = {
    "duckdb": Dialect(
        integer_divide="({a} // {b})",
        ordered_list="list({value} ORDER BY timestamp, event_order)",
        epoch_seconds="CAST(floor(epoch({value})) AS BIGINT)",
        parquet_files="read_parquet('{folder}/*.parquet')",
    ),
    "spark": Dialect(
        integer_divide="({a} div {b})",
        # collect_list keeps no order: sort (timestamp, order, value) structs, then keep the value.
        ordered_list="transform(array_sort(collect_list(struct(timestamp, event_order, {value} AS v))), x -> x.v)",
        epoch_seconds="CAST(unix_timestamp({value}) AS BIGINT)",
        parquet_files="parquet.`{folder}`",
    ),
}

# Canonical columns of every row, with its order key. `{columns}` casts ids to strings, as the in-memory path holds them.
EVENTS_SQL = "SELECT * FROM (SELECT {columns}, file_index * {row_factor} + file_row AS event_order FROM raw_events) rows {where}"
# One pass over the log for the checks: counts of bad values per column, and the range of the timestamps.
CHECKS_SQL = "SELECT COUNT(*), MIN(timestamp), MAX(timestamp), {bad_counts} FROM raw_events"
FIRST_BAD_SQL = "SELECT file_index, file_row, {column} FROM raw_events WHERE {bad} ORDER BY file_index, file_row LIMIT 1"
# Exact duplicates (every column equal) keep their first occurrence.
DEDUPLICATED_SQL = "SELECT {names}, MIN(event_order) AS event_order FROM {source} GROUP BY {names}"
SEQUENCES_SQL = "SELECT user_id, {lists} FROM deduplicated GROUP BY user_id ORDER BY user_id"
ITEM_COUNTS_SQL = "SELECT item_id, COUNT(*) AS count FROM deduplicated GROUP BY item_id"
ITEM_TOTALS_SQL = "SELECT item_id, CAST(SUM(count) AS BIGINT) AS count FROM {source} GROUP BY item_id ORDER BY count DESC, item_id"
SUMMARY_SQL = "SELECT COUNT(*), COUNT(DISTINCT user_id), MAX(timestamp) FROM deduplicated"
ACTIONS_SQL = "SELECT action, COUNT(*) FROM deduplicated GROUP BY action ORDER BY action"
SURFACES_SQL = "SELECT DISTINCT surface FROM deduplicated ORDER BY surface"
USER_ITEM_PAIRS_SQL = "SELECT COUNT(*) FROM (SELECT DISTINCT user_id, item_id FROM deduplicated) pairs"


@dataclass
class PreparedEvents:
    """What `prepare_events` wrote, read back from its `prepared.json`."""

    path: str
    engine: str
    sources: list[str]
    events_read: int
    duplicates_dropped: int
    events: int
    users: int
    items: int
    actions: dict[str, int]
    timestamp_unit: str
    max_timestamp: int
    item_repeat_share: float
    cut_timestamp: Optional[int] = None
    surfaces: Optional[list[str]] = None
    seconds: float = 0.0

    @classmethod
    def load(cls, path: Union[str, Path]) -> "PreparedEvents":
        meta = Path(path) / PREPARED_FILE
        if not meta.is_file():
            raise FileNotFoundError(f"{path} holds no {PREPARED_FILE}: prepare it first (recipes/prepare_events.py).")
        return cls(**{**json.loads(meta.read_text()), "path": str(path)})

    @property
    def sequence_files(self) -> list[str]:
        """The sequence shards, in user order."""
        return sorted(str(p) for p in (Path(self.path) / SEQUENCES_DIR).glob("*.parquet"))

    def sequences(self) -> pa.Table:
        """Every user's sequence in one table (small logs and tests; training streams the shards instead)."""
        return pa.concat_tables([pq.read_table(f) for f in self.sequence_files])

    def item_counts(self) -> pa.Table:
        """`item_id`, `count`: most frequent first, ties by item id (the tokenizer's vocabulary order)."""
        return pq.read_table(Path(self.path) / ITEM_COUNTS_FILE)

    def repeat_share(self) -> float:
        """Share of events whose item the same user had before (as `EventTable.repeat_share`)."""
        return self.item_repeat_share

    def tokenizer(self, **kwargs) -> "PinFMTokenizer":
        """The tokenizer of these events: `PinFMTokenizer.from_item_counts` over the engine's counts."""
        from ..tokenization_pinfm import PinFMTokenizer

        counts = self.item_counts()
        return PinFMTokenizer.from_item_counts(
            counts["item_id"], counts["count"], actions=list(self.actions), surfaces=self.surfaces or (), **kwargs
        )

    def encoded_splits(
        self, tokenizer, *, train_holdout: int, max_length: int, windows: bool, max_train_users: Optional[int] = None,
        max_eval_users: Optional[int] = None,
    ) -> "EncodedSplits":
        """
        `train`, `valid`, `test` encoded for pretraining as `recipes/pretrain.py` encodes in-memory splits, under
        `cache/` here: the sequence files are read and encoded a batch of users at a time (`ENCODE_BATCH_USERS`), never
        held in memory whole. `train` becomes Arrow shards for [`StreamingBatches`] (about `TRAIN_SHARDS` of them, so
        that processes share them evenly), `valid` and `test` one Arrow file each that `datasets` memory-maps. Run it on
        the main process first: the other processes then read the same files (their names hash the settings and the
        vocabulary).
        """
        import datasets

        known = "\x00".join([*tokenizer.item_tokens, str(tokenizer.num_hash_buckets), *tokenizer.action_tokens])
        vocabulary = hashlib.sha1(known.encode()).hexdigest()[:16]
        encoders = {
            "train": (lambda t: tokenizer.encode_sequences(t, windows=windows), max_train_users),
            "valid": (lambda t: tokenizer.encode_sequences(t, max_length=max_length, hold_out_last=True), max_eval_users),
        }
        encoders["test"] = encoders["valid"]
        folders = {}
        for split, (encode, users) in encoders.items():
            folder = Path(self.path) / "cache" / f"{split}-{train_holdout}-{max_length}-{windows}-{users}-{vocabulary}"
            if not (folder / SHARDS_FILE).exists():
                shard_rows = min(ENCODE_BATCH_USERS, max(MIN_SHARD_ROWS, -(-min(self.users, users or self.users) // TRAIN_SHARDS)))
                self._encode(folder, split, encode, train_holdout, users, tokenizer.vocab_size,
                             shard_rows if split == "train" else None)
            folders[split] = folder
        evaluation = {split: datasets.Dataset.from_file(str(folders[split] / _shard_name(0))) for split in ("valid", "test")}
        return EncodedSplits(
            TrainShards.load(folders["train"]), evaluation["valid"], evaluation["test"],
            np.load(folders["train"] / TOKEN_COUNTS_FILE),
        )

    def _encode(
        self, folder: Path, split: str, encode, train_holdout: int, max_users: Optional[int], vocab_size: int,
        shard_rows: Optional[int],
    ) -> None:
        """
        Write `encode(prepared_split(batch))` of every batch of users, in order, to Arrow stream files of at most
        `shard_rows` rows each (one file when None), indexed by a `shards.json` ([`TrainShards`]), with the count of
        each token id in `input_ids` (`token_counts.npy`: the items' popularity, counted here because reading it back
        would bring the whole column into memory). The folder is written atomically.
        """
        from tqdm.auto import tqdm

        with atomic_folder(folder) as tmp, tqdm(total=self.users, desc=f"Encoding {split}", unit=" users") as progress:
            shards = _ShardWriter(tmp, shard_rows)
            counts = np.zeros(vocab_size, dtype=np.int64)
            users = 0
            for batch in self._sequence_batches():
                progress.update(batch.num_rows)
                table = prepared_split(pa.Table.from_batches([batch]), split, train_holdout)
                if max_users is not None:
                    table = table.slice(0, max_users - users)
                users += table.num_rows
                encoded = encode(table)
                ids = encoded["input_ids"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
                counts += np.bincount(ids, minlength=vocab_size)
                shards.write(encoded)
                if max_users is not None and users >= max_users:
                    break
            shards.close()
            np.save(tmp / TOKEN_COUNTS_FILE, counts)
            TrainShards.write_index(tmp, shards.files, shards.rows, shards.tokens)

    def _sequence_batches(self) -> Iterator[pa.RecordBatch]:
        for file in self.sequence_files:
            yield from pq.ParquetFile(file).iter_batches(batch_size=ENCODE_BATCH_USERS)

    def summary(self) -> dict:
        """Counts of events, distinct users and items, and events per action (as `EventTable.summary`)."""
        return {"events": self.events, "users": self.users, "items": self.items, "actions": dict(self.actions)}

    def describe(self) -> str:
        return (f"{self.path}: {self.events:,} events, {self.users:,} users, {self.items:,} items, {len(self.actions)} "
                f"actions; {self.duplicates_dropped:,} duplicates dropped (prepared on {self.engine})")


@dataclass
class EncodedSplits:
    """[`PreparedEvents.encoded_splits`]: the training shards, the evaluation splits, the token counts of `train`."""

    train: TrainShards
    valid: "datasets.Dataset"
    test: "datasets.Dataset"
    train_item_counts: np.ndarray  # events of each token id in the training rows (`tokenizer.item_counts`)


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


class _ShardWriter:
    """Encoded tables -> Arrow stream files of at most `shard_rows` rows (one file when None), counted as they go."""

    def __init__(self, folder: Path, shard_rows: Optional[int]):
        self.folder, self.shard_rows = folder, shard_rows
        self.files: list[str] = []
        self.rows: list[int] = []
        self.tokens: list[int] = []
        self._sink = self._writer = None

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None or (self.shard_rows is not None and self.rows[-1] >= self.shard_rows):
                self._open(table.schema)
            part = table if self.shard_rows is None else table.slice(0, self.shard_rows - self.rows[-1])
            self._writer.write_table(part, max_chunksize=ENCODED_BATCH_ROWS)
            self.rows[-1] += part.num_rows
            self.tokens[-1] += int(pc.sum(pc.list_value_length(part["input_ids"])).as_py() or 0)
            table = table.slice(part.num_rows)

    def _open(self, schema: pa.Schema) -> None:
        self.close()
        self.files.append(_shard_name(len(self.files)))
        self.rows.append(0)
        self.tokens.append(0)
        self._sink = open(self.folder / self.files[-1], "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None


def event_files(events: Union[str, Path, Sequence[Union[str, Path]]]) -> list[str]:
    """The event files that a file, a folder (its CSV/Parquet files) or a glob names, sorted: the file order."""
    patterns = [events] if isinstance(events, (str, Path)) else list(events)
    files: list[str] = []
    for pattern in map(str, patterns):
        if Path(pattern).is_dir():
            found = [str(p) for p in Path(pattern).iterdir() if p.is_file() and _format(p.name) is not None]
        else:
            found = [f for f in glob.glob(pattern) if Path(f).is_file()]
        if not found:
            raise FileNotFoundError(f"--events {pattern!r} names no CSV or Parquet file.")
        unknown = [f for f in found if _format(f) is None]
        if unknown:
            raise ValueError(f"--events: {unknown[0]} is not a CSV (.csv/.tsv, optionally .gz) or Parquet file.")
        files.extend(str(Path(f).resolve()) for f in found)
    files = sorted(set(files))
    formats = {_format(f) for f in files}
    if len(formats) > 1:
        raise ValueError(f"--events mixes {' and '.join(sorted(formats))} files; give one format at a time.")
    return files


def _format(name: str) -> Optional[str]:
    lower = name.lower()
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith((".csv", ".csv.gz")):
        return "csv"
    if lower.endswith((".tsv", ".tsv.gz")):
        return "tsv"
    return None


def prepared_split(sequences: pa.Table, split: str, train_holdout: int = 2) -> pa.Table:
    """
    The leave-last-out split of prepared sequences, by the rules of `leave_last_out_split`: `train` drops each user's
    last `train_holdout` events, `valid` the last one, `test` none; users too short for a split are left out of it.
    """
    drop, min_length = split_rules(train_holdout)[split]
    kept = sequences.filter(pc.greater_equal(pc.list_value_length(sequences["item_ids"]), min_length))
    return _drop_last(kept, drop)


def prepare_events(
    events: Union[str, Path, Sequence[Union[str, Path]]],
    output_dir: Union[str, Path],
    *,
    engine: str = "duckdb",
    columns: Optional[dict[str, str]] = None,
    timestamp_unit: str = "auto",
    cut_timestamp: Optional[int] = None,
    memory_limit: Optional[str] = "3GB",
    threads: Optional[int] = None,
    spark_master: Optional[str] = None,
) -> PreparedEvents:
    """
    Prepare event files for pretraining on `engine` ("duckdb" or "spark"); see the module docstring.

    Args:
        events: a file, a folder of CSV/Parquet files or a glob (or a list of them).
        output_dir: the folder to write (replaced atomically if it exists).
        columns: canonical name (`user_id`, `item_id`, `action`, `timestamp`, `surface`) -> column name in the files.
        timestamp_unit: "s", "ms", "us", "ns", or "auto" to tell it from the magnitudes (as `validate_events`).
        cut_timestamp: keep only the events before this unix time (a global time split for pretraining).
        memory_limit, threads: DuckDB's; the log may be far larger than `memory_limit` (DuckDB spills to disk).
        spark_master: Spark's master URL (default `local[*]`).
    """
    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}.")
    started = time.perf_counter()
    files = event_files(events)
    fmt = _format(files[0])
    output_dir = Path(output_dir)
    with atomic_folder(output_dir) as tmp:
        sql = _DuckDB(memory_limit, threads, tmp / ".spill") if engine == "duckdb" else _Spark(spark_master)
        try:
            meta = _prepare(sql, DIALECTS[engine], files, fmt, tmp, columns or {}, timestamp_unit, cut_timestamp)
        finally:
            sql.close()
        shutil.rmtree(tmp / ".spill", ignore_errors=True)
        meta["seconds"] = round(time.perf_counter() - started, 1)
        atomic_write_json(tmp / PREPARED_FILE, meta)
    prepared = PreparedEvents.load(output_dir)
    logger.info(f"Prepared {prepared.describe()} in {prepared.seconds:.0f} s.")
    return prepared


def _prepare(sql, dialect: Dialect, files, fmt, out: Path, columns, timestamp_unit, cut_timestamp) -> dict:
    wanted = {name: columns.get(name, name) for name in (*EVENT_COLUMNS, SURFACE_COLUMN)}
    types = sql.register(files, fmt, wanted)
    missing = [f"{wanted[c]!r}" for c in EVENT_COLUMNS if c not in types]
    if missing:
        raise EventValidationError(f"{_source(files)}: missing column(s) {', '.join(missing)}; found {sorted(types)}")
    names = [c for c in (*EVENT_COLUMNS, SURFACE_COLUMN) if c in types]

    # Checks, in one pass: every bad value is counted, the first one is then located by file and row.
    bad = {name: _bad_value(name, types[name]) for name in names}
    logger.info(f"Checking {_source(files)} ({sql.name}) ...")
    counts = sql.rows(CHECKS_SQL.format(bad_counts=", ".join(f"SUM(CASE WHEN {b} THEN 1 ELSE 0 END)" for b in bad.values())))[0]
    num_rows, low, high = counts[:3]
    if not num_rows:
        raise EventValidationError(f"{_source(files)}: no events (zero rows)")
    for (name, condition), count in zip(bad.items(), counts[3:]):
        if count:
            file_index, row, value = sql.rows(FIRST_BAD_SQL.format(column=name, bad=condition))[0]
            line = f"line {row + 2}" if fmt != "parquet" else f"row {row}"
            problem = "is missing" if value is None else f"{value!r} {_PROBLEMS.get(name, 'is not valid')}"
            raise EventValidationError(f"{files[file_index]}, {line}, column '{wanted[name]}': value {problem} "
                                       f"({count:,} such rows)")

    unit = _timestamp_unit(types["timestamp"], low, high, timestamp_unit, _source(files))
    timestamp = _seconds(dialect, types["timestamp"], unit)
    casts = {name: (timestamp if name == "timestamp" else _as_string(name, types[name])) for name in names}
    where = "" if cut_timestamp is None else f"WHERE timestamp < {int(cut_timestamp)}"
    sql.view("events", EVENTS_SQL.format(columns=", ".join(f"{e} AS {n}" for n, e in casts.items()), row_factor=ROW_FACTOR,
                                         where=where))

    # Users in ranges small enough for the engine's memory (one range on Spark, which partitions on its own), each
    # deduplicated and grouped on its own: a user's events, duplicates included, all fall in one range.
    lists = ", ".join(
        f"{dialect.ordered_list.format(value=name)} AS {SEQUENCE_COLUMNS[name]}" for name in names if name != "user_id"
    )
    total = {"events": 0, "users": 0, "pairs": 0, "max_timestamp": None, "actions": {}, "surfaces": set()}
    ranges = sql.user_ranges(names, num_rows, out / ".buckets")
    for index, source in enumerate(ranges):
        logger.info(f"Grouping per-user sequences ({index + 1}/{len(ranges)}) ...")
        sql.view("deduplicated", DEDUPLICATED_SQL.format(names=", ".join(names), source=source))
        sql.write_sequences(SEQUENCES_SQL.format(lists=lists), out / SEQUENCES_DIR, index)
        sql.write_parquet(ITEM_COUNTS_SQL, out / ".item_counts" / f"part-{index:05d}.parquet")
        events, users, max_timestamp = sql.rows(SUMMARY_SQL)[0]
        total["events"] += events
        total["users"] += users
        total["pairs"] += sql.rows(USER_ITEM_PAIRS_SQL)[0][0]
        if max_timestamp is not None:
            total["max_timestamp"] = max(max_timestamp, total["max_timestamp"] or max_timestamp)
        for action, count in sql.rows(ACTIONS_SQL):
            total["actions"][action] = total["actions"].get(action, 0) + count
        if SURFACE_COLUMN in names:
            total["surfaces"].update(row[0] for row in sql.rows(SURFACES_SQL))
    if not total["events"]:
        raise ValueError(f"No event before the cut {cut_timestamp}: {num_rows:,} events from {low} to {high} ({unit}).")
    sql.write_parquet(ITEM_TOTALS_SQL.format(source=dialect.parquet_files.format(folder=out / ".item_counts")),
                      out / ITEM_COUNTS_FILE)
    kept = num_rows if cut_timestamp is None else sql.rows("SELECT COUNT(*) FROM events")[0][0]
    duplicates = kept - total["events"]
    if duplicates:
        logger.warning(f"{_source(files)}: dropped {duplicates:,} exact duplicate event(s) out of {kept:,}.")
    for scratch in (".buckets", ".item_counts"):
        shutil.rmtree(out / scratch, ignore_errors=True)
    return {
        "engine": sql.name, "sources": files, "events_read": int(num_rows), "duplicates_dropped": int(duplicates),
        "events": int(total["events"]), "users": int(total["users"]), "items": pq.read_metadata(out / ITEM_COUNTS_FILE).num_rows,
        "actions": {a: int(total["actions"][a]) for a in sorted(total["actions"])}, "timestamp_unit": unit,
        "max_timestamp": int(total["max_timestamp"]), "item_repeat_share": 1.0 - total["pairs"] / total["events"],
        "cut_timestamp": cut_timestamp,
        "surfaces": sorted(total["surfaces"]) if SURFACE_COLUMN in names else None,
    }


_PROBLEMS = {"timestamp": "is not a non-negative whole number of time units"}


def _source(files: list[str]) -> str:
    return files[0] if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"


def _kind(sql_type: str) -> str:
    t = sql_type.upper()
    if any(k in t for k in ("INT", "LONG", "SHORT", "BYTE")) and "INTERVAL" not in t:
        return "integer"
    if any(k in t for k in ("DOUBLE", "FLOAT", "REAL", "DECIMAL")):
        return "float"
    if "TIMESTAMP" in t or t == "DATE" or t.startswith("DATE"):
        return "time"
    return "string"


def _bad_value(name: str, sql_type: str) -> str:
    """A SQL condition true where `name` holds a value the in-memory validation refuses (`validate_events`)."""
    column, kind = name, _kind(sql_type)
    if name == "timestamp":
        if kind == "integer":
            return f"({column} IS NULL OR {column} < 0)"
        if kind == "float":
            return f"({column} IS NULL OR isnan({column}) OR {column} < 0 OR {column} > 1e19)"
        if kind == "time":
            return f"({column} IS NULL)"
        # Strings: whole numbers only (ISO dates need the in-memory path, see the module docstring).
        return f"({column} IS NULL OR TRY_CAST(trim({column}) AS BIGINT) IS NULL OR TRY_CAST(trim({column}) AS BIGINT) < 0)"
    if kind == "float":
        return f"({column} IS NULL OR isnan({column}) OR {column} <> floor({column}))"
    if kind == "integer":
        return f"({column} IS NULL)"
    return f"({column} IS NULL OR trim({column}) = '')"


def _as_string(name: str, sql_type: str) -> str:
    kind = _kind(sql_type)
    if kind == "float":  # 1.0 is the id "1", as in the in-memory path
        return f"CAST(CAST({name} AS BIGINT) AS STRING)"
    return name if kind == "string" else f"CAST({name} AS STRING)"


def _timestamp_unit(sql_type: str, low, high, timestamp_unit: str, source: str) -> str:
    """The unit of numeric timestamps: given, or told by magnitude (mixed magnitudes are refused, as in memory)."""
    if _kind(sql_type) == "time":
        return "s"
    low, high = float(low), float(high)
    low_unit, high_unit = _unit_of(low), _unit_of(high)
    if high_unit is None:
        raise EventValidationError(f"{source}, column 'timestamp': value {high:.0f} is too large for a unix time.")
    if timestamp_unit != "auto":
        return timestamp_unit
    if low_unit != high_unit and low >= 10**8:
        raise EventValidationError(
            f"{source}, column 'timestamp': values from {low:.0f} (unix {_UNIT_NAMES[low_unit]}) to {high:.0f} (unix "
            f"{_UNIT_NAMES[high_unit]}): units are mixed; set --timestamp_unit to the column's unit."
        )
    if high_unit != "s":
        logger.warning(f"{source}, column 'timestamp': values are unix {_UNIT_NAMES[high_unit]}; converted to seconds.")
    return high_unit


def _seconds(dialect: Dialect, sql_type: str, unit: str) -> str:
    kind = _kind(sql_type)
    if kind == "time":
        return dialect.epoch_seconds.format(value="timestamp")
    value = {"integer": "CAST(timestamp AS BIGINT)", "float": "CAST(floor(timestamp) AS BIGINT)"}.get(
        kind, "CAST(trim(timestamp) AS BIGINT)")
    factor = _UNIT_FACTORS[unit]
    return value if factor == 1 else dialect.integer_divide.format(a=value, b=factor)


def _gib(size: str) -> float:
    """DuckDB's memory sizes ('3GB', '500MB', '2GiB') in GiB."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)i?B?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--memory_limit {size!r} is not a size such as '3GB' or '500MB'.")
    return float(match.group(1)) * 1024.0 ** ("KMGT".index(match.group(2).upper()) - 2 if match.group(2) else -3)


def _default_memory_gib() -> float:
    """DuckDB's default memory limit: 80% of the physical memory (GiB)."""
    return 0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class _DuckDB:
    """DuckDB in this process: out of core under `memory_limit`, spilling to `spill_dir`."""

    name = "duckdb"

    def __init__(self, memory_limit: Optional[str], threads: Optional[int], spill_dir: Path):
        try:
            import duckdb
        except ImportError:
            raise ImportError("--engine duckdb needs DuckDB: pip install 'pinfm-hf[scale]' (or pip install duckdb).") from None
        self.con = duckdb.connect()
        self.memory_limit_gib = _gib(memory_limit) if memory_limit else _default_memory_gib()
        if memory_limit:
            self.con.execute(f"SET memory_limit = {_quote(memory_limit)}")
        if threads:
            self.con.execute(f"SET threads = {int(threads)}")
        self.con.execute(f"SET temp_directory = {_quote(str(spill_dir))}")
        self.con.execute("SET enable_progress_bar = true")

    def register(self, files: list[str], fmt: str, wanted: dict[str, str]) -> dict[str, str]:
        listed = "[" + ", ".join(map(_quote, files)) + "]"
        if fmt == "parquet":
            source = f"read_parquet({listed}, filename = true, file_row_number = true, union_by_name = true)"
            row = "file_row_number"
        else:
            delimiter = "\\t" if fmt == "tsv" else ","
            # CSV has no row-number column: number each file's rows in the order one reader per file yields them.
            source = (f"read_csv({listed}, header = true, all_varchar = true, filename = true, delim = '{delimiter}', "
                      "parallel = false)")
            row = "row_number() OVER (PARTITION BY filename) - 1"
        present = {d[0] for d in self.con.execute(f"SELECT * FROM {source} LIMIT 0").description}
        selected = {c: n for c, n in wanted.items() if n in present}
        projection = ", ".join(f"{_ident(n)} AS {c}" for c, n in selected.items())
        self.con.execute(f"CREATE VIEW raw_events AS SELECT {projection}, list_position({listed}, filename) - 1 AS "
                         f"file_index, {row} AS file_row FROM {source}")
        description = self.con.execute("SELECT * FROM raw_events LIMIT 0").description
        return {d[0]: str(d[1]) for d in description if d[0] in selected}

    def view(self, name: str, query: str) -> None:
        self.con.execute(f"CREATE OR REPLACE VIEW {name} AS {query}")

    def rows(self, query: str) -> list[tuple]:
        return self.con.execute(query).fetchall()

    def user_ranges(self, names: list[str], num_rows: int, folder: Path) -> list[str]:
        """
        Sources of the events of consecutive user ranges, each about `EVENTS_PER_GB * memory_limit` events: DuckDB
        spills sorts and hash tables to disk, but a user's ordered lists are built in memory, so a log larger than
        memory is cut by user (ranges from a sample of the ids) into Parquet partitions in one pass, then each
        partition is grouped on its own.
        """
        num_ranges = max(1, math.ceil(num_rows / (EVENTS_PER_GB * self.memory_limit_gib)))
        if num_ranges == 1:
            return ["events"]
        sample = sorted(row[0] for row in self.rows(
            f"SELECT user_id FROM events USING SAMPLE reservoir({SAMPLED_USERS} ROWS) REPEATABLE (0)"))
        bounds = sorted({sample[len(sample) * k // num_ranges] for k in range(1, num_ranges)})
        bucket = "CASE " + " ".join(f"WHEN user_id < {_quote(b)} THEN {k}" for k, b in enumerate(bounds)) + f" ELSE {len(bounds)} END"
        logger.info(f"Cutting {num_rows:,} events into {len(bounds) + 1} user ranges ...")
        self.con.execute(f"COPY (SELECT {', '.join(names)}, event_order, {bucket} AS bucket FROM events) TO "
                         f"{_quote(str(folder))} (FORMAT parquet, PARTITION_BY (bucket))")
        return [f"read_parquet({_quote(str(part / '*.parquet'))}, hive_partitioning = false)"
                for part in sorted(folder.glob("bucket=*"), key=lambda part: int(part.name.split("=")[1]))]

    def write_sequences(self, query: str, folder: Path, index: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.write_parquet(query, folder / f"part-{index:05d}.parquet")

    def write_parquet(self, query: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.con.execute(f"COPY ({query}) TO {_quote(str(path))} (FORMAT parquet, ROW_GROUP_SIZE 65536)")

    def close(self) -> None:
        self.con.close()


class _Spark:
    """Apache Spark (`pyspark`): `local[*]` on this machine, or the cluster that `master` names."""

    name = "spark"

    def __init__(self, master: Optional[str]):
        try:
            from pyspark.sql import SparkSession
        except ImportError:
            raise ImportError("--engine spark needs PySpark: pip install 'pinfm-hf[spark]' (and Java 17+).") from None
        self.spark = (
            SparkSession.builder.master(master or "local[*]").appName("pinfm-prepare-events")
            .config("spark.sql.session.timeZone", "UTC").config("spark.ui.enabled", "false")
            .config("spark.sql.ansi.enabled", "false")
            # On one machine, 200 shuffle partitions (the cluster default) is mostly task overhead.
            .config("spark.sql.shuffle.partitions", "8" if (master or "local").startswith("local") else "200")
            .getOrCreate()
        )

    def register(self, files: list[str], fmt: str, wanted: dict[str, str]) -> dict[str, str]:
        from pyspark.sql import functions as F

        frames = []
        for index, path in enumerate(files):
            if fmt == "parquet":  # Parquet's row index is a metadata column (Spark 3.5+): exact and free
                frame = self.spark.read.parquet(path)
                frame = frame.select("*", F.col("_metadata.row_index").alias("file_row"))
            else:  # CSV has none: zipWithIndex numbers the rows in file order, whatever the partitioning (slower)
                frame = self.spark.read.csv(path, header=True, sep="\t" if fmt == "tsv" else ",", inferSchema=False)
                schema = frame.schema.add("file_row", "long")
                frame = frame.rdd.zipWithIndex().map(lambda pair: (*pair[0], pair[1])).toDF(schema)
            frames.append(frame.withColumn("file_index", F.lit(index).cast("long")))
        frame = frames[0]
        for other in frames[1:]:
            frame = frame.unionByName(other, allowMissingColumns=True)
        selected = {c: n for c, n in wanted.items() if n in frame.columns}
        frame = frame.select(*[F.col(f"`{n}`").alias(c) for c, n in selected.items()], "file_index", "file_row")
        frame.createOrReplaceTempView("raw_events")
        return {field.name: field.dataType.simpleString() for field in frame.schema if field.name in selected}

    def view(self, name: str, query: str) -> None:
        self.spark.sql(query).createOrReplaceTempView(name)

    def rows(self, query: str) -> list[tuple]:
        return [tuple(row) for row in self.spark.sql(query).collect()]

    def user_ranges(self, names: list[str], num_rows: int, folder: Path) -> list[str]:
        return ["events"]  # Spark partitions the grouping itself, spilling where it must

    def write_sequences(self, query: str, folder: Path, index: int) -> None:
        # A global ORDER BY writes range partitions in order: part-00000 holds the first users.
        self.spark.sql(query).write.mode("overwrite").parquet(str(folder))
        for junk in folder.iterdir():
            if not junk.name.endswith(".parquet"):
                junk.unlink()
        _number_parts(folder, lambda p: int(p.name.split("-")[1]))

    def write_parquet(self, query: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(str(path) + ".spark")
        self.spark.sql(query).coalesce(1).write.mode("overwrite").parquet(str(scratch))
        (part,) = scratch.glob("part-*.parquet")
        part.rename(path)
        shutil.rmtree(scratch)

    def close(self) -> None:
        self.spark.stop()


def _number_parts(folder: Path, order) -> None:
    """Rename an engine's output files to part-00000.parquet, ... in the order the engine wrote them."""
    parts = sorted(folder.glob("*.parquet"), key=order)
    for index, part in enumerate(parts):
        part.rename(folder / f"tmp-{index:05d}.parquet")
    for index in range(len(parts)):
        (folder / f"tmp-{index:05d}.parquet").rename(folder / f"part-{index:05d}.parquet")
