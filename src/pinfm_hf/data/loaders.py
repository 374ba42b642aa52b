"""Readers of raw interaction files (MovieLens, Taobao UserBehavior, generic CSV/Parquet) into `EventTable`s.

All readers use `pyarrow.csv` with every column typed as a string, then validate with `validate_events`, so a
bad value is reported with its file, line and column instead of failing inside the CSV parser.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from transformers.utils import logging

from .events import (
    EVENT_COLUMNS,
    SURFACE_COLUMN,
    EventTable,
    EventValidationError,
    _NUMBER_REGEX,
    check_mask,
    first_true,
    make_event_table,
)


logger = logging.get_logger(__name__)

PathLike = Union[str, Path]

DEFAULT_POSITIVE_ACTIONS = {"ml-1m": ("rating_4", "rating_5"), "taobao": ("cart", "fav", "buy")}
MOVIELENS_ACTIONS = tuple(f"rating_{r}" for r in range(1, 6))
TAOBAO_ACTIONS = ("pv", "cart", "fav", "buy")


def _existing_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such file: {path}")
    return path


def _first_bad_line(path: Path, *, delimiter: str, num_fields: int, encoding: str) -> Optional[str]:
    # Only runs after pyarrow rejected the file, to point at the offending line.
    with open(path, encoding=encoding, newline="") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            got = len(line.split(delimiter))
            if got != num_fields:
                return f"{path}, line {number}: expected {num_fields} fields separated by {delimiter!r}, got {got}"
    return None


def _read_text_table(
    path: Path,
    *,
    column_names: Sequence[str],
    delimiter: str,
    skip_rows: int = 0,
    encoding: str = "utf8",
    include_columns: Optional[Sequence[str]] = None,
    quote_char: Union[str, bool] = False,
    fields: Optional[tuple[str, int]] = None,
) -> pa.Table:
    """Read a delimited file with every column as a string, blank lines kept (so line numbers stay exact: a
    blank line is an error, not a silently skipped row). Quoting is off unless `quote_char` is given, since
    MovieLens titles hold quotes. `fields` is the (separator, count) a line must have, for error messages."""
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(
                column_names=list(column_names), skip_rows=skip_rows, encoding=encoding, block_size=1 << 24
            ),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=quote_char, ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in column_names},
                include_columns=list(include_columns) if include_columns else None,
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        separator, count = fields or (delimiter, len(column_names))
        # With quoting on, a plain split cannot count fields, so only the parser's message is given.
        located = None
        if not quote_char:
            located = _first_bad_line(path, delimiter=separator, num_fields=count, encoding=encoding)
        raise EventValidationError(located or f"{path}: cannot parse ({str(e).splitlines()[0]})") from e
    if table.num_columns > 1:
        # pyarrow reads a blank line as a row of empty strings; name it rather than its first empty column.
        blank = pc.equal(pc.utf8_length(table.column(0)), 0)
        for column in table.columns[1:]:
            blank = pc.and_(blank, pc.equal(pc.utf8_length(column), 0))
        row = first_true(blank)
        if row >= 0:
            raise EventValidationError(f"{path}, line {row + skip_rows + 1}: the line is blank")
    return table


def _read_header(path: Path, *, delimiter: str) -> list[str]:
    with open(path, encoding="utf8", newline="") as f:
        header = f.readline().rstrip("\r\n")
    if not header:
        raise EventValidationError(f"{path}, line 1: empty header line")
    return header.split(delimiter)


def _read_atomic(path: Path) -> pa.Table:
    """RecBole atomic file: tab-separated, header `name:type`; columns renamed to `name`."""
    raw_names = _read_header(path, delimiter="\t")
    table = _read_text_table(path, column_names=raw_names, delimiter="\t", skip_rows=1)
    return table.rename_columns([name.split(":", 1)[0] for name in raw_names])


def _ratings_to_actions(ratings: pa.ChunkedArray, *, source: str, line_offset: int) -> pa.ChunkedArray:
    """Ratings 1..5 (as text, "4" or "4.0") -> `rating_1` .. `rating_5`."""
    kw = {"source": source, "column": "rating", "line_offset": line_offset}
    check_mask(pc.invert(pc.match_substring_regex(ratings, _NUMBER_REGEX)), ratings, problem="is not a number", **kw)
    values = pc.cast(pc.utf8_trim_whitespace(ratings), pa.float64())
    bad = pc.invert(pc.is_in(values, value_set=pa.array([1.0, 2.0, 3.0, 4.0, 5.0])))
    check_mask(bad, ratings, problem="is not a rating in 1..5", **kw)
    return pc.binary_join_element_wise("rating_", pc.cast(pc.cast(values, pa.int64()), pa.string()), "")


def _lookup(keys: pa.ChunkedArray, table_keys: pa.Array, table_values: pa.Array) -> pa.ChunkedArray:
    # Order-preserving left join (Table.join reorders rows); keys absent from the side table give null.
    return pc.take(table_values, pc.index_in(keys, value_set=table_keys))


def _file_in(path: PathLike, suffix: str) -> Path:
    """`path` itself, or the one `*<suffix>` file inside it when `path` is a folder."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob(f"*{suffix}"))
        if len(candidates) != 1:
            raise FileNotFoundError(f"Expected exactly one {suffix} file in {path}, found {[c.name for c in candidates]}")
        path = candidates[0]
    return _existing_file(path)


def load_movielens_atomic(path: PathLike, *, with_genres: bool = True) -> EventTable:
    """
    Load RecBole's atomic MovieLens (`ml-1m.inter`, plus `ml-1m.item` for genres).

    Args:
        path (`str` or `Path`): the `.inter` file, or the folder holding it.
        with_genres (`bool`, *optional*, defaults to `True`): join the `genre` feature (space-separated genre
            names, kept as is) from the `.item` file next to it, when that file exists.

    Returns:
        `EventTable` with actions `rating_1` .. `rating_5`.
    """
    path = _file_in(path, ".inter")
    raw = _read_atomic(path)
    source = str(path)
    missing = [c for c in ("user_id", "item_id", "rating", "timestamp") if c not in raw.column_names]
    if missing:
        raise EventValidationError(f"{source}: missing column(s) {', '.join(map(repr, missing))}")
    actions = _ratings_to_actions(raw["rating"], source=source, line_offset=2)
    table = pa.table({"user_id": raw["user_id"], "item_id": raw["item_id"], "action": actions,
                      "timestamp": raw["timestamp"]})
    item_path = path.with_suffix(".item")
    if with_genres and item_path.is_file():
        items = _read_atomic(item_path)
        if "genre" not in items.column_names:
            raise EventValidationError(f"{item_path}: missing column 'genre'")
        items = items.combine_chunks()
        table = table.append_column("genre", _lookup(table["item_id"], items["item_id"], items["genre"]))
    elif with_genres:
        logger.warning(f"{item_path} not found: loading {path.name} without the `genre` feature.")
    return make_event_table(table, source=source, allowed_actions=MOVIELENS_ACTIONS, line_offset=2)


def load_movielens_dat(path: PathLike) -> EventTable:
    """
    Load GroupLens `ratings.dat` (`UserID::MovieID::Rating::Timestamp`, no header).

    A `movies.dat` next to it (`MovieID::Title::Genres`, genres `|`-separated) adds the `genre` feature,
    normalised to space-separated like the atomic format.
    """
    path = _existing_file(path)
    source = str(path)
    # pyarrow takes one-character delimiters: split on ":" and keep the even fields (ids and numbers hold no ":").
    names = ["user_id", "_1", "item_id", "_2", "rating", "_3", "timestamp"]
    raw = _read_text_table(path, column_names=names, delimiter=":", fields=("::", 4))
    actions = _ratings_to_actions(raw["rating"], source=source, line_offset=1)
    table = pa.table({"user_id": raw["user_id"], "item_id": raw["item_id"], "action": actions,
                      "timestamp": raw["timestamp"]})
    movies_path = path.with_name("movies.dat")
    if movies_path.is_file():
        ids, genres = [], []
        # GroupLens ships movies.dat in latin-1; it is 4k lines, so plain Python is fine here.
        with open(movies_path, encoding="latin-1") as f:
            for number, line in enumerate(f, start=1):
                fields = line.rstrip("\r\n").split("::")
                if len(fields) != 3:
                    raise EventValidationError(f"{movies_path}, line {number}: expected 3 fields separated by '::'")
                ids.append(fields[0])
                genres.append(fields[2].replace("|", " "))
        table = table.append_column("genre", _lookup(table["item_id"], pa.array(ids), pa.array(genres)))
    return make_event_table(table, source=source, allowed_actions=MOVIELENS_ACTIONS, line_offset=1)


def load_movielens_users(path: PathLike) -> pa.Table:
    """Load `ml-1m.user` (file or folder) as a table of strings: `user_id`, `age`, `gender`, `occupation`."""
    path = _file_in(path, ".user")
    raw = _read_atomic(path)
    wanted = ["user_id", "age", "gender", "occupation"]
    missing = [c for c in wanted if c not in raw.column_names]
    if missing:
        raise EventValidationError(f"{path}: missing column(s) {', '.join(map(repr, missing))}")
    return raw.select(wanted)


def load_user_features_from_args(user_features: str, dataset: str, data_dir: PathLike) -> Optional[pa.Table]:
    """
    The recipes' `--user_features`: `"auto"` (`ml-1m.user` for ML-1M, none otherwise), `"none"`, or a CSV/Parquet
    file with `user_id` and one column per feature (read as strings).
    """
    if user_features == "none":
        return None
    if user_features == "auto":
        return load_movielens_users(Path(data_dir) / "ml-1m") if dataset == "ml-1m" else None
    path = Path(user_features)
    if not path.is_file():
        raise FileNotFoundError(f"User features file {path} does not exist (--user_features).")
    table = pq.read_table(path) if path.suffix in (".parquet", ".pq") else pacsv.read_csv(path)
    if "user_id" not in table.column_names:
        raise EventValidationError(f"{path}: user features need a 'user_id' column, found {table.column_names}.")
    return table.cast(pa.schema([(name, pa.string()) for name in table.column_names]))


def load_taobao(path: PathLike) -> EventTable:
    """
    Load Taobao `UserBehavior.csv` (no header: user_id, item_id, category_id, behavior, timestamp).

    Behaviours become actions `pv`, `cart`, `fav`, `buy` (any other is an error); `category_id` becomes the
    `category` item feature.
    """
    path = _existing_file(path)
    names = ["user_id", "item_id", "category", "action", "timestamp"]
    table = _read_text_table(path, column_names=names, delimiter=",")
    return make_event_table(
        table.select(["user_id", "item_id", "action", "timestamp", "category"]),
        source=str(path), allowed_actions=TAOBAO_ACTIONS, line_offset=1,
    )


def load_events(
    path: PathLike,
    *,
    columns: Optional[dict[str, str]] = None,
    allowed_actions: Optional[Iterable[str]] = None,
    item_features: Sequence[str] = (),
    format: Optional[str] = None,
) -> EventTable:
    """
    Load a generic event file: CSV (with a header; `.tsv` is tab-separated) or Parquet.

    Args:
        path (`str` or `Path`): the file.
        columns (`dict[str, str]`, *optional*): canonical name -> column name in the file, for any of
            `user_id`, `item_id`, `action`, `timestamp`, `surface` and the `item_features`; unmapped names are
            looked up as is.
        allowed_actions (`Iterable[str]`, *optional*): when given, any other action is an error.
        item_features (`Sequence[str]`, *optional*): canonical names of item feature columns to keep.
        format (`str`, *optional*): `"csv"`, `"tsv"` or `"parquet"`; defaults to the file extension.
    """
    path = _existing_file(path)
    source = str(path)
    fmt = (format or path.suffix.lstrip(".")).lower()
    fmt = {"pq": "parquet", "txt": "csv"}.get(fmt, fmt)
    if fmt not in ("csv", "tsv", "parquet"):
        raise ValueError(f"Cannot tell the format of {path}: pass `format='csv'`, `'tsv'` or `'parquet'`.")
    columns = dict(columns or {})
    unknown = set(columns) - set(EVENT_COLUMNS) - {SURFACE_COLUMN} - set(item_features)
    if unknown:
        raise ValueError(f"`columns` maps unknown canonical name(s) {sorted(unknown)}; add them to `item_features`?")

    if fmt == "parquet":
        try:
            file_columns = pq.read_schema(path).names
        except pa.ArrowInvalid as e:
            raise EventValidationError(f"{source}: not a readable Parquet file ({e})") from e
        delimiter, line_offset = None, None
    else:
        delimiter = "\t" if fmt == "tsv" else ","
        file_columns, line_offset = _read_header(path, delimiter=delimiter), 2

    wanted = [*EVENT_COLUMNS, *item_features]
    surface_name = columns.get(SURFACE_COLUMN, SURFACE_COLUMN)
    if surface_name in file_columns:
        wanted.insert(len(EVENT_COLUMNS), SURFACE_COLUMN)
    elif SURFACE_COLUMN in columns:
        raise EventValidationError(f"{source}: missing column {surface_name!r} (mapped from 'surface')")
    missing = [f"{columns.get(c, c)!r}" for c in wanted if columns.get(c, c) not in file_columns]
    if missing:
        raise EventValidationError(f"{source}: missing column(s) {', '.join(missing)}; found {file_columns}")
    file_names = [columns.get(c, c) for c in wanted]

    if fmt == "parquet":
        table = pq.read_table(path, columns=file_names)
    else:
        table = _read_text_table(
            path, column_names=file_columns, delimiter=delimiter, skip_rows=1, include_columns=file_names,
            quote_char='"',
        )
    table = table.select(file_names).rename_columns(wanted)
    return make_event_table(
        table, source=source, allowed_actions=allowed_actions, line_offset=line_offset,
        item_features=list(item_features),
    )


def load_dataset_by_name(name: str, data_dir: PathLike) -> EventTable:
    """`"ml-1m"` -> `data_dir/ml-1m` (atomic, with genres); `"taobao"` -> `data_dir/taobao-sample/UserBehavior.csv`."""
    data_dir = Path(data_dir)
    if name == "ml-1m":
        return load_movielens_atomic(data_dir / "ml-1m")
    if name == "taobao":
        return load_taobao(data_dir / "taobao-sample" / "UserBehavior.csv")
    raise ValueError(f"Unknown data set {name!r}; known: 'ml-1m', 'taobao' (or use `load_events` on a file).")


def load_events_from_args(dataset: str, data_dir: PathLike, columns: Optional[str] = None) -> EventTable:
    """
    The recipes' `--dataset`/`--data_dir`/`--columns`: a shared data set by name (`"ml-1m"`, `"taobao"`), or a
    CSV/Parquet event file of the user's own, with `columns` a JSON object mapping canonical to file column names.
    """
    if dataset in ("ml-1m", "taobao"):
        return load_dataset_by_name(dataset, data_dir)
    mapping = None
    if columns:
        try:
            mapping = json.loads(columns)
        except json.JSONDecodeError as err:
            raise ValueError(f"--columns must be a JSON object such as '{{\"user_id\": \"uid\"}}': {err}") from None
        if not isinstance(mapping, dict):
            raise ValueError(f"--columns must be a JSON object mapping canonical to file column names, got {mapping!r}.")
    return load_events(dataset, columns=mapping)


@dataclass
class EventSourceArguments:
    """The recipes' flags naming the events to read: a shared data set by name, or a CSV/Parquet file of one's own."""

    dataset: str = field(default="ml-1m", metadata={"help": "'ml-1m', 'taobao', or a CSV/Parquet event file of your own."})
    data_dir: str = field(default="../shared/data", metadata={"help": "Folder holding ml-1m/ and taobao-sample/."})
    columns: Optional[str] = field(
        default=None, metadata={"help": 'Own files: JSON map from canonical to file column, e.g. \'{"user_id": "uid"}\'.'}
    )

    def load_events(self) -> EventTable:
        return load_events_from_args(self.dataset, self.data_dir, self.columns)
