"""Readers of raw interaction files (MovieLens, Taobao UserBehavior, Amazon Sports, generic CSV/TSV/Parquet and
RecBole atomic `.inter` files) into `EventTable`s.

All readers use `pyarrow.csv` with every column typed as a string, then validate with `validate_events`, so a
bad value is reported with its file, line and column instead of failing inside the CSV parser. Text files may be
compressed (`.gz`, `.bz2`, `.zst`, `.lz4`: pyarrow decompresses by extension) and may start with a UTF-8 BOM;
header names may be quoted (Excel, R's `write.csv`).
"""

from __future__ import annotations

import csv
import io
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
    NUMBER_REGEX,
    SURFACE_COLUMN,
    TIMESTAMP_UNITS,
    EventTable,
    EventValidationError,
    check_mask,
    check_timestamp_unit,
    first_true,
    make_event_table,
)


logger = logging.get_logger(__name__)

PathLike = Union[str, Path]

KNOWN_DATASETS = ("ml-1m", "taobao", "amazon-sports")
DATASET_ALIASES = {"sports": "amazon-sports"}
DEFAULT_POSITIVE_ACTIONS = {
    "ml-1m": ("rating_4", "rating_5"), "taobao": ("cart", "fav", "buy"), "amazon-sports": ("review",),
    "sports": ("review",),
}
MOVIELENS_ACTIONS = tuple(f"rating_{r}" for r in range(1, 6))
TAOBAO_ACTIONS = ("pv", "cart", "fav", "buy")
# Action given to every event of a RecBole `.inter` file that has neither an `action` nor a `rating` column.
DEFAULT_ACTION = "interact"
# pyarrow decompresses text files by these extensions.
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")
_FORMAT_ALIASES = {"pq": "parquet", "txt": "csv", "atomic": "inter"}
EVENT_FILE_KINDS = (
    "CSV/TSV files with a header (.csv, .tsv, .txt; also compressed .gz/.bz2/.zst/.lz4), Parquet files "
    "(.parquet, .pq) and RecBole atomic .inter files"
)


def _existing_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such file: {path}")
    return path


def _open_binary(path: Path) -> io.BufferedReader:
    # pa.input_stream decompresses by extension, like pyarrow.csv.read_csv does.
    return io.BufferedReader(pa.input_stream(str(path)))


def _not_utf8(error: UnicodeDecodeError) -> str:
    byte = error.object[error.start : error.start + 1].hex()
    return (f"byte 0x{byte} at position {error.start + 1} is not UTF-8; save the file as UTF-8 "
            "(it may be latin-1 or cp1252)")


def _locate_parse_error(
    path: Path, *, delimiter: str, num_fields: int, quote_char: Union[str, bool], skip_rows: int
) -> Optional[str]:
    """Point at the first line pyarrow could not read: bytes that are not UTF-8, or a wrong number of fields."""
    # Only runs after pyarrow rejected the file. Blank lines are skipped: pyarrow reads them, the caller names them.
    with _open_binary(path) as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                return f"{path}, line {number}: {_not_utf8(e)}"
            if not quote_char and number > skip_rows and line:
                got = len(line.split(delimiter))
                if got != num_fields:
                    return f"{path}, line {number}: expected {num_fields} fields separated by {delimiter!r}, got {got}"
    if quote_char:
        # Quoted fields may hold the delimiter: count them with the csv module (this error path only).
        with _open_binary(path) as f:
            reader = csv.reader(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""), delimiter=delimiter,
                                quotechar=quote_char)
            for row in reader:
                if reader.line_num > skip_rows and row and len(row) != num_fields:
                    return (f"{path}, line {reader.line_num}: expected {num_fields} fields separated by {delimiter!r}, "
                            f"got {len(row)}")
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
        located = _locate_parse_error(path, delimiter=separator, num_fields=count, quote_char=quote_char,
                                      skip_rows=skip_rows)
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


def _read_header(
    path: Path, *, delimiter: str, quote_char: Union[str, bool] = False, sniff: bool = False
) -> tuple[list[str], str]:
    """
    The column names on line 1 as pyarrow parses them (UTF-8 BOM dropped, quotes removed), and the delimiter.

    With `sniff`, a header holding no `delimiter` but tabs or semicolons (a TSV saved as `.csv`, a European
    Excel export) switches to that delimiter, with a logged notice.
    """
    with _open_binary(path) as f:
        line = f.readline()
    if line.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in line:
        raise EventValidationError(
            f"{path}, line 1: the file looks UTF-16 encoded (Excel's 'Unicode Text'); save it as UTF-8 (CSV UTF-8)"
        )
    try:
        text = line.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise EventValidationError(f"{path}, line 1: {_not_utf8(e)}") from None
    if not line:
        raise EventValidationError(f"{path}: the file is empty (expected a header line naming the columns)")
    if not text:
        raise EventValidationError(f"{path}, line 1: empty header line")
    if sniff and delimiter not in text:
        found = next((d for d in ("\t", ";") if d in text), None)
        if found:
            logger.warning(
                f"{path}: the header has no {delimiter!r} but has {found!r}: reading it as {found!r}-separated."
            )
            delimiter = found
    try:
        header = pacsv.read_csv(
            io.BytesIO(line.rstrip(b"\r\n") + b"\n"),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=quote_char),
        )
    except pa.ArrowInvalid as e:
        raise EventValidationError(f"{path}, line 1: cannot parse the header ({str(e).splitlines()[0]})") from None
    return header.column_names, delimiter


def _field_positions(source: str, header: Sequence[str], wanted: dict[str, str]) -> dict[str, int]:
    """Header position of each wanted column (canonical -> file name); missing or repeated names are errors."""
    missing = [f"{name!r}" + (f" (for {canonical!r})" if name != canonical else "")
               for canonical, name in wanted.items() if name not in header]
    if missing:
        raise EventValidationError(f"{source}: missing column(s) {', '.join(missing)}; found {list(header)}")
    positions = {}
    for canonical, name in wanted.items():
        found = [i for i, h in enumerate(header) if h == name]
        if len(found) > 1:
            raise EventValidationError(
                f"{source}, line 1: column {name!r} appears {len(found)} times in the header (fields "
                f"{', '.join(str(i + 1) for i in found)}); rename the copies"
            )
        positions[canonical] = found[0]
    return positions


def _read_fields(
    path: Path, *, header: Sequence[str], wanted: dict[str, str], delimiter: str, quote_char: Union[str, bool]
) -> pa.Table:
    """Read the `wanted` columns (canonical -> header name) of a file with a header, named by their canonical names."""
    positions = _field_positions(str(path), header, wanted)
    # Positional names: header names may be empty (R's row-name column) or repeated in columns nobody reads.
    names = [f"f{i}" for i in range(len(header))]
    table = _read_text_table(
        path, column_names=names, delimiter=delimiter, skip_rows=1, quote_char=quote_char,
        include_columns=sorted({names[i] for i in positions.values()}),
    )
    return pa.table({canonical: table[names[i]] for canonical, i in positions.items()})


def _atomic_header(path: Path) -> list[str]:
    """RecBole atomic header names without their `:type` suffix (`user_id:token` -> `user_id`)."""
    header, _ = _read_header(path, delimiter="\t")
    return [name.split(":", 1)[0] for name in header]


def _read_atomic(path: Path, names: Sequence[str]) -> pa.Table:
    """The `names` columns of a RecBole atomic file (tab-separated, no quoting, header `name:type`)."""
    return _read_fields(path, header=_atomic_header(path), wanted={n: n for n in names}, delimiter="\t",
                        quote_char=False)


def _ratings_to_actions(
    ratings: pa.ChunkedArray, *, source: str, line_offset: int, one_to_five: bool = True
) -> pa.ChunkedArray:
    """Ratings as text ("4", "4.0", "3.5") -> `rating_4`, `rating_3.5`; MovieLens (`one_to_five`) allows 1..5 only."""
    kw = {"source": source, "column": "rating", "line_offset": line_offset}
    check_mask(pc.invert(pc.match_substring_regex(ratings, NUMBER_REGEX)), ratings, problem="is not a number", **kw)
    values = pc.cast(pc.utf8_trim_whitespace(ratings), pa.float64())
    if one_to_five:
        bad = pc.invert(pc.is_in(values, value_set=pa.array([1.0, 2.0, 3.0, 4.0, 5.0])))
        check_mask(bad, ratings, problem="is not a rating in 1..5", **kw)
    # A float cast to text drops a zero fraction: 4.0 -> "4", 3.5 -> "3.5".
    return pc.binary_join_element_wise("rating_", pc.cast(values, pa.string()), "")


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


def load_movielens_atomic(path: PathLike, *, with_genres: bool = True, timestamp_unit: str = "auto") -> EventTable:
    """
    Load RecBole's atomic MovieLens (`ml-1m.inter`, plus `ml-1m.item` for genres).

    Args:
        path (`str` or `Path`): the `.inter` file, or the folder holding it.
        with_genres (`bool`, *optional*, defaults to `True`): join the `genre` feature (space-separated genre
            names, kept as is) from the `.item` file next to it, when that file exists.
        timestamp_unit (`str`, *optional*, defaults to `"auto"`): see `validate_events`; the public file is in
            seconds.

    Returns:
        `EventTable` with actions `rating_1` .. `rating_5`.
    """
    path = _file_in(path, ".inter")
    raw = _read_atomic(path, ("user_id", "item_id", "rating", "timestamp"))
    source = str(path)
    actions = _ratings_to_actions(raw["rating"], source=source, line_offset=2)
    table = pa.table({"user_id": raw["user_id"], "item_id": raw["item_id"], "action": actions,
                      "timestamp": raw["timestamp"]})
    item_path = path.with_suffix(".item")
    if with_genres and item_path.is_file():
        items = _read_atomic(item_path, ("item_id", "genre")).combine_chunks()
        table = table.append_column("genre", _lookup(table["item_id"], items["item_id"], items["genre"]))
    elif with_genres:
        logger.warning(f"{item_path} not found: loading {path.name} without the `genre` feature.")
    return make_event_table(
        table, source=source, allowed_actions=MOVIELENS_ACTIONS, line_offset=2, timestamp_unit=timestamp_unit
    )


def load_movielens_dat(path: PathLike, *, timestamp_unit: str = "auto") -> EventTable:
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
    return make_event_table(
        table, source=source, allowed_actions=MOVIELENS_ACTIONS, line_offset=1, timestamp_unit=timestamp_unit
    )


def load_movielens_users(path: PathLike) -> pa.Table:
    """Load `ml-1m.user` (file or folder) as a table of strings: `user_id`, `age`, `gender`, `occupation`."""
    return _read_atomic(_file_in(path, ".user"), ("user_id", "age", "gender", "occupation"))


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


def load_taobao(path: PathLike, *, timestamp_unit: str = "auto") -> EventTable:
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
        source=str(path), allowed_actions=TAOBAO_ACTIONS, line_offset=1, timestamp_unit=timestamp_unit,
    )


def load_amazon_sports(path: PathLike, *, timestamp_unit: str = "auto") -> EventTable:
    """Load the Amazon "Sports and Outdoors" 5-core `sports.csv` (`user_id,item_id,action,timestamp`, header)."""
    return load_events(_file_in(path, ".csv"), format="csv", timestamp_unit=timestamp_unit)


def _file_format(path: Path, format: Optional[str]) -> str:
    """`csv`, `tsv`, `parquet` or `inter`, from `format` or the extension (before any compression suffix)."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    compressed = bool(suffixes) and suffixes[-1] in COMPRESSION_SUFFIXES
    if format is None:
        extension = suffixes[-2] if compressed and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
        format = "" if compressed and len(suffixes) == 1 else extension.lstrip(".")
    fmt = _FORMAT_ALIASES.get(format.lower(), format.lower())
    if fmt not in ("csv", "tsv", "parquet", "inter"):
        raise ValueError(
            f"Cannot tell the format of {path}: expected {EVENT_FILE_KINDS}; or pass `format=` ('csv', 'tsv', "
            f"'parquet' or 'inter')."
        )
    if fmt == "parquet" and compressed:
        raise ValueError(f"{path}: Parquet compresses inside the file; decompress the {suffixes[-1]} file first.")
    return fmt


def load_events(
    path: PathLike,
    *,
    columns: Optional[dict[str, str]] = None,
    allowed_actions: Optional[Iterable[str]] = None,
    item_features: Sequence[str] = (),
    format: Optional[str] = None,
    timestamp_unit: str = "auto",
) -> EventTable:
    """
    Load a generic event file: CSV/TSV with a header, Parquet, or a RecBole atomic `.inter` file.

    CSV and TSV files may be compressed (`.csv.gz`, ...), start with a UTF-8 BOM and quote their header names and
    values (Excel, R's `write.csv`; R's unnamed row-name column is ignored). A `.csv` whose header holds tabs or
    semicolons but no commas is read with that delimiter, with a notice. RecBole atomic files are tab-separated
    without quoting; their `:type` header suffixes are dropped (`user_id:token` -> `user_id`) before `columns`
    applies. When such a file has no `action` column, a `rating` column gives actions `rating_<r>` (`rating_4`,
    `rating_3.5`), as for MovieLens, and otherwise every event gets the action `"interact"`.

    Args:
        path (`str` or `Path`): the file.
        columns (`dict[str, str]`, *optional*): canonical name -> column name in the file, for any of
            `user_id`, `item_id`, `action`, `timestamp`, `surface` and the `item_features`; unmapped names are
            looked up as is. Two canonical names may not read the same column.
        allowed_actions (`Iterable[str]`, *optional*): when given, any other action is an error.
        item_features (`Sequence[str]`, *optional*): canonical names of item feature columns to keep.
        format (`str`, *optional*): `"csv"`, `"tsv"`, `"parquet"` or `"inter"`; defaults to the file extension.
        timestamp_unit (`str`, *optional*, defaults to `"auto"`): unit of numeric timestamps, `"s"`, `"ms"`,
            `"us"`, `"ns"`, or `"auto"` to tell it from their magnitude (see `validate_events`).
    """
    check_timestamp_unit(timestamp_unit)
    path = _existing_file(path)
    source = str(path)
    fmt = _file_format(path, format)
    columns = dict(columns or {})
    unknown = set(columns) - set(EVENT_COLUMNS) - {SURFACE_COLUMN} - set(item_features)
    if unknown:
        raise ValueError(f"`columns` maps unknown canonical name(s) {sorted(unknown)}; add them to `item_features`?")

    if fmt == "parquet":
        try:
            file_columns = pq.read_schema(path).names
        except (pa.ArrowInvalid, OSError) as e:
            raise EventValidationError(f"{source}: not a readable Parquet file ({str(e).splitlines()[0]})") from e
        delimiter, quote_char, line_offset = None, False, None
    elif fmt == "inter":
        file_columns, delimiter, quote_char, line_offset = _atomic_header(path), "\t", False, 2
    else:
        quote_char, line_offset = '"', 2
        file_columns, delimiter = _read_header(
            path, delimiter="\t" if fmt == "tsv" else ",", quote_char=quote_char, sniff=fmt == "csv"
        )

    wanted = [*EVENT_COLUMNS, *item_features]
    surface_name = columns.get(SURFACE_COLUMN, SURFACE_COLUMN)
    if surface_name in file_columns or SURFACE_COLUMN in columns:
        wanted.insert(len(EVENT_COLUMNS), SURFACE_COLUMN)
    file_names = {c: columns.get(c, c) for c in wanted}
    readers: dict[str, list[str]] = {}
    for canonical, name in file_names.items():
        readers.setdefault(name, []).append(canonical)
    shared = {name: names for name, names in readers.items() if len(names) > 1}
    if shared:
        name, names = next(iter(shared.items()))
        raise ValueError(
            f"{source}: {' and '.join(map(repr, names))} would both read column {name!r}; map each to its own column "
            f"(`columns`/--columns)."
        )
    default_action = None
    if fmt == "inter" and "action" not in columns and "action" not in file_columns:
        # RecBole interaction files rarely have an action column: derive one (documented above).
        default_action = "rating" if "rating" in file_columns and "rating" not in readers else DEFAULT_ACTION
        if default_action == "rating":
            file_names["action"] = "rating"
        else:
            del file_names["action"]
        derived = "'rating_<rating>'" if default_action == "rating" else repr(DEFAULT_ACTION)
        logger.info(f"{source}: no 'action' column; actions are {derived}.")

    if fmt == "parquet":
        missing = [f"{n!r}" for n in file_names.values() if n not in file_columns]
        if missing:
            raise EventValidationError(f"{source}: missing column(s) {', '.join(missing)}; found {file_columns}")
        table = pq.read_table(path, columns=list(dict.fromkeys(file_names.values())))
        table = pa.table({canonical: table[name] for canonical, name in file_names.items()})
    else:
        table = _read_fields(path, header=file_columns, wanted=file_names, delimiter=delimiter, quote_char=quote_char)
    if default_action == "rating":
        table = table.set_column(
            table.column_names.index("action"), "action",
            _ratings_to_actions(table["action"], source=source, line_offset=2, one_to_five=False),
        )
    elif default_action is not None:
        table = table.append_column("action", pa.repeat(pa.scalar(DEFAULT_ACTION), table.num_rows))
    return make_event_table(
        table, source=source, allowed_actions=allowed_actions, line_offset=line_offset,
        item_features=list(item_features), timestamp_unit=timestamp_unit,
    )


def _known_names() -> str:
    return ", ".join([*KNOWN_DATASETS, *DATASET_ALIASES])


def load_dataset_by_name(name: str, data_dir: PathLike, *, timestamp_unit: str = "auto") -> EventTable:
    """
    A shared data set under `data_dir` by name: `"ml-1m"` -> `ml-1m/` (atomic, with genres), `"taobao"` ->
    `taobao-sample/UserBehavior.csv`, `"amazon-sports"` (or `"sports"`) -> `amazon-sports/sports.csv`.
    """
    data_dir = Path(data_dir)
    name = DATASET_ALIASES.get(name, name)
    if name == "ml-1m":
        return load_movielens_atomic(data_dir / "ml-1m", timestamp_unit=timestamp_unit)
    if name == "taobao":
        return load_taobao(data_dir / "taobao-sample" / "UserBehavior.csv", timestamp_unit=timestamp_unit)
    if name == "amazon-sports":
        return load_amazon_sports(data_dir / "amazon-sports" / "sports.csv", timestamp_unit=timestamp_unit)
    raise ValueError(f"Unknown data set {name!r}; known: {_known_names()} (or use `load_events` on a file).")


def _is_event_file(path: Path) -> bool:
    try:
        _file_format(path, None)
    except ValueError:
        return False
    return path.is_file() and not path.name.startswith(".")


def _event_file_from_arg(dataset: str) -> Path:
    """The event file `--dataset` names: a file, or a folder holding exactly one event file."""
    path = Path(dataset)
    accepted = f"accepted: the known data sets ({_known_names()}), {EVENT_FILE_KINDS}, or a folder holding one of them"
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if _is_event_file(p))
        if len(found) == 1:
            logger.info(f"--dataset {dataset}: reading its only event file, {found[0]}.")
            return path / found[0]
        holds = "no event file"
        if found:
            holds = f"{len(found)} event files ({', '.join(found[:5])}{', ...' if len(found) > 5 else ''})"
        raise FileNotFoundError(f"--dataset {dataset!r} is a folder holding {holds}: name one file; {accepted}.")
    if not path.is_file():
        raise FileNotFoundError(f"--dataset {dataset!r} is neither a known data set nor an existing file; {accepted}.")
    return path


def load_events_from_args(
    dataset: str, data_dir: PathLike, columns: Optional[str] = None, timestamp_unit: str = "auto"
) -> EventTable:
    """
    The recipes' `--dataset`/`--data_dir`/`--columns`/`--timestamp_unit`: a shared data set by name (see
    `load_dataset_by_name`), or an event file of the user's own (see `load_events`; a folder holding exactly one
    event file also works), with `columns` a JSON object mapping canonical to file column names.
    """
    check_timestamp_unit(timestamp_unit)
    if DATASET_ALIASES.get(dataset, dataset) in KNOWN_DATASETS:
        if columns:
            raise ValueError(f"--columns applies to event files of your own, not to the known data set {dataset!r}.")
        return load_dataset_by_name(dataset, data_dir, timestamp_unit=timestamp_unit)
    mapping = None
    if columns:
        try:
            mapping = json.loads(columns)
        except json.JSONDecodeError as err:
            raise ValueError(f"--columns must be a JSON object such as '{{\"user_id\": \"uid\"}}': {err}") from None
        if not isinstance(mapping, dict):
            raise ValueError(f"--columns must be a JSON object mapping canonical to file column names, got {mapping!r}.")
    return load_events(_event_file_from_arg(dataset), columns=mapping, timestamp_unit=timestamp_unit)


@dataclass
class EventSourceArguments:
    """The recipes' flags naming the events to read: a shared data set by name, or an event file of one's own."""

    dataset: str = field(
        default="ml-1m",
        metadata={"help": "'ml-1m', 'taobao', 'amazon-sports' (or 'sports'), or an event file of your own: CSV/TSV "
                  "with a header (also .gz), Parquet, or a RecBole atomic .inter file (or a folder holding exactly one)."},
    )
    data_dir: str = field(
        default="../shared/data", metadata={"help": "Folder holding ml-1m/, taobao-sample/ and amazon-sports/."}
    )
    columns: Optional[str] = field(
        default=None, metadata={"help": 'Own files: JSON map from canonical to file column, e.g. \'{"user_id": "uid"}\'.'}
    )
    timestamp_unit: str = field(
        default="auto",
        metadata={"help": f"Unit of numeric timestamps, one of {', '.join(TIMESTAMP_UNITS)}: 'auto' tells it from "
                  "their magnitude and converts ms/us/ns to seconds with a notice; an explicit unit is checked."},
    )

    def __post_init__(self) -> None:
        check_timestamp_unit(self.timestamp_unit)  # a bad unit fails when the flags are parsed, before data is read

    def load_events(self) -> EventTable:
        return load_events_from_args(self.dataset, self.data_dir, self.columns, self.timestamp_unit)
