"""Prepare an event log of any size for pretraining: validated, deduplicated, per-user sequences as Parquet shards.

    python recipes/prepare_events.py --events 'logs/*.parquet' --output_dir data/prepared             # DuckDB
    python recipes/prepare_events.py --events logs/ --output_dir data/prepared --engine spark \\
        --spark_master spark://host:7077                                                              # a cluster

DuckDB runs in this process and spills to disk under --memory_limit, so one machine prepares logs far larger than its
memory; Spark runs the same queries where the log lives on a cluster. The output folder holds the sequences
(`sequences/part-*.parquet`, one row per user), the item counts (the tokenizer's vocabulary) and `prepared.json`.
Bad input stops with the file, row and column at fault; exact duplicates are dropped and counted.
"""

import json
import logging as pylogging
from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser
from transformers.utils import logging

from pinfm_hf.data import TIMESTAMP_UNITS, prepare_events
from pinfm_hf.data.prepare import ENGINES


@dataclass
class PrepareEventsArguments:
    events: str = field(metadata={"help": "Event files: a CSV/TSV/Parquet file, a folder of them, or a quoted glob."})
    output_dir: str = field(metadata={"help": "Folder to write (replaced atomically when the preparation succeeds)."})
    engine: str = field(default="duckdb", metadata={"help": "'duckdb' (in this process) or 'spark'.", "choices": list(ENGINES)})
    columns: Optional[str] = field(
        default=None, metadata={"help": 'JSON map from canonical to file column names, e.g. \'{"user_id": "uid"}\'.'}
    )
    timestamp_unit: str = field(
        default="auto", metadata={"help": "Unit of numeric timestamps; 'auto' tells it from their magnitude.",
                                  "choices": list(TIMESTAMP_UNITS)},
    )
    cut_timestamp: Optional[int] = field(
        default=None, metadata={"help": "Keep only the events before this unix time (pretrain before a CTR test period)."}
    )
    memory_limit: str = field(default="3GB", metadata={"help": "DuckDB's memory limit; it spills to disk beyond it."})
    threads: Optional[int] = field(default=None, metadata={"help": "DuckDB threads (default: every core)."})
    spark_master: Optional[str] = field(default=None, metadata={"help": "Spark master URL (default local[*])."})


def main(args: Optional[list[str]] = None) -> dict:
    (prepare_args,) = HfArgumentParser(PrepareEventsArguments).parse_args_into_dataclasses(args=args)
    pylogging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=pylogging.INFO)
    logging.set_verbosity_info()
    columns = json.loads(prepare_args.columns) if prepare_args.columns else None
    prepared = prepare_events(
        prepare_args.events, prepare_args.output_dir, engine=prepare_args.engine, columns=columns,
        timestamp_unit=prepare_args.timestamp_unit, cut_timestamp=prepare_args.cut_timestamp,
        memory_limit=prepare_args.memory_limit, threads=prepare_args.threads, spark_master=prepare_args.spark_master,
    )
    print(prepared.describe())
    return prepared.__dict__


if __name__ == "__main__":
    main()
