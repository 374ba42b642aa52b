import gzip
import itertools
import logging
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pinfm_hf.data import DEFAULT_POSITIVE_ACTIONS, EVENT_COLUMNS, EventSourceArguments, EventValidationError
from pinfm_hf.data.loaders import (
    load_dataset_by_name, load_events, load_events_from_args, load_movielens_atomic, load_movielens_dat,
    load_movielens_users, load_taobao, load_user_features_from_args,
)


INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def write(path, text):
    path.write_text(text, encoding="utf8")
    return path


@pytest.fixture
def inter_dir(tmp_path):
    write(tmp_path / "mini.inter", INTER_HEADER + "1m_1\tToy Story (1995)\t5\t978300760\n"
          '1m_1\t"Weird" Title, The (1999)\t3\t978300761.0\n1m_2\tToy Story (1995)\t4\t978300700\n')
    write(tmp_path / "mini.item", "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\n"
          "Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy\n")
    return tmp_path


def test_movielens_atomic_small(inter_dir):
    events = load_movielens_atomic(inter_dir)
    assert events.table.to_pylist() == [
        {"user_id": "1m_1", "item_id": "Toy Story (1995)", "action": "rating_5", "timestamp": 978300760,
         "genre": "Animation Children's Comedy"},
        # Quotes are data, not quoting; items missing from the .item file get a null genre.
        {"user_id": "1m_1", "item_id": '"Weird" Title, The (1999)', "action": "rating_3", "timestamp": 978300761,
         "genre": None},
        {"user_id": "1m_2", "item_id": "Toy Story (1995)", "action": "rating_4", "timestamp": 978300700,
         "genre": "Animation Children's Comedy"},
    ]
    assert events.item_features == ("genre",)
    assert load_movielens_atomic(inter_dir / "mini.inter", with_genres=False).table.column_names == list(EVENT_COLUMNS)


@pytest.mark.parametrize(
    "row, expected",
    [
        ("1m_1\tA\t6\t978300760", r"mini\.inter, line 3, column 'rating': value '6' is not a rating in 1\.\.5"),
        ("1m_1\tA\tgood\t978300760", r"mini\.inter, line 3, column 'rating': value 'good' is not a number"),
        ("1m_1\tA\t4\tabc", r"mini\.inter, line 3, column 'timestamp': value 'abc' is not a number"),
        ("1m_1\tA\t4\t-3", r"mini\.inter, line 3, column 'timestamp': value '-3' is negative"),
        ("\tA\t4\t1", r"mini\.inter, line 3, column 'user_id': value '' is empty"),
        ("1m_1\t\t4\t1", r"mini\.inter, line 3, column 'item_id': value '' is empty"),
        ("1m_1\tA\t4", r"mini\.inter, line 3: expected 4 fields separated by '\\t', got 3"),
        ("", r"mini\.inter, line 3: the line is blank"),
    ],
)
def test_movielens_atomic_errors_name_file_line_column(tmp_path, row, expected):
    path = write(tmp_path / "mini.inter", INTER_HEADER + "1m_1\tB\t1\t978300000\n" + row + "\n1m_2\tB\t2\t5\n")
    with pytest.raises(EventValidationError, match=expected):
        load_movielens_atomic(path)


def test_crlf_line_endings(tmp_path):
    path = tmp_path / "mini.inter"
    path.write_bytes((INTER_HEADER + "1m_1\tA\t4\t5\n1m_1\tB\t1\tx\n").replace("\n", "\r\n").encode())
    with pytest.raises(EventValidationError, match=r"line 3, column 'timestamp': value 'x'"):
        load_movielens_atomic(path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.inter"):
        load_movielens_atomic(tmp_path / "nope.inter")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_movielens_atomic(tmp_path)
    with pytest.raises(FileNotFoundError, match="UserBehavior.csv"):
        load_taobao(tmp_path / "UserBehavior.csv")
    with pytest.raises(FileNotFoundError, match="ratings.dat"):
        load_movielens_dat(tmp_path / "ratings.dat")
    with pytest.raises(FileNotFoundError, match="x.parquet"):
        load_events(tmp_path / "x.parquet")


def test_taobao_small_and_errors(tmp_path):
    path = write(tmp_path / "ub.csv", "1,10,100,pv,1511544070\n1,11,100,buy,1511544071\n2,10,100,fav,5\n")
    events = load_taobao(path)
    assert events.table.column_names == [*EVENT_COLUMNS, "category"]
    assert events.table["action"].to_pylist() == ["pv", "buy", "fav"]
    assert events.table["category"].to_pylist() == ["100"] * 3
    write(path, "1,10,100,pv,1511544070\n1,11,100,like,1511544071\n")
    with pytest.raises(EventValidationError, match=r"ub\.csv, line 2, column 'action': value 'like' is not a known"):
        load_taobao(path)
    write(path, "1,10,100,pv,1511544070\n1,11,100,pv,1511544071,extra\n")
    with pytest.raises(EventValidationError, match=r"ub\.csv, line 2: expected 5 fields separated by ',', got 6"):
        load_taobao(path)


def test_taobao_duplicates_counted(tmp_path):
    path = write(tmp_path / "ub.csv", "1,10,100,pv,1\n1,10,100,pv,1\n1,10,100,pv,2\n1,10,100,pv,1\n")
    events = load_taobao(path)
    assert (events.num_rows_read, events.num_duplicates_dropped, len(events)) == (4, 2, 2)


def test_movielens_dat_from_atomic_slice(tmp_path, shared_data_dir, ml1m_events):
    """Converts the first rows of ml-1m.inter to GroupLens .dat files and loads them back."""
    source = shared_data_dir / "ml-1m"
    with open(source / "ml-1m.inter", encoding="utf8") as f:
        rows = [line.rstrip("\r\n").split("\t") for line in itertools.islice(f, 1, 501)]
    item_genre = dict(
        (line.split("\t")[0], line.split("\t")[3])
        for line in (source / "ml-1m.item").read_text(encoding="utf8").splitlines()[1:]
    )
    movie_ids = {title: str(i) for i, title in enumerate(sorted({r[1] for r in rows}), start=1)}
    user_ids = {u: u.removeprefix("1m_") for u in {r[0] for r in rows}}
    write(tmp_path / "ratings.dat", "".join(f"{user_ids[u]}::{movie_ids[m]}::{r}::{t}\n" for u, m, r, t in rows))
    write(tmp_path / "movies.dat", "".join(
        f"{i}::{title}::{item_genre[title].replace(' ', '|')}\n" for title, i in movie_ids.items()))

    dat = load_movielens_dat(tmp_path / "ratings.dat")
    assert len(dat) == 500 and dat.num_duplicates_dropped == 0
    expected = ml1m_events.table.slice(0, 500)
    assert dat.table["action"].equals(expected["action"])
    assert dat.table["timestamp"].equals(expected["timestamp"])
    assert dat.table["genre"].equals(expected["genre"])  # "|" normalised to spaces
    assert dat.table["user_id"].to_pylist() == [user_ids[u] for u in expected["user_id"].to_pylist()]


def test_movielens_dat_errors(tmp_path):
    path = write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3\n")
    with pytest.raises(EventValidationError, match=r"ratings\.dat, line 2: expected 4 fields separated by '::'"):
        load_movielens_dat(path)
    write(path, "1::1193::5::978300760\n1::661::0::978302109\n")
    with pytest.raises(EventValidationError, match=r"ratings\.dat, line 2, column 'rating': value '0' is not a rating"):
        load_movielens_dat(path)


def test_load_events_csv_with_column_map(tmp_path):
    path = write(tmp_path / "log.csv", 'uid,pin,kind,ts,where,cat\n7,p1,save,100,home,"a,b"\n7,p2,click,90,search,c\n')
    events = load_events(
        path, columns={"user_id": "uid", "item_id": "pin", "action": "kind", "timestamp": "ts", "surface": "where",
                       "category": "cat"},
        item_features=("category",), allowed_actions=("save", "click"),
    )
    assert events.has_surface and events.item_features == ("category",)
    assert events.table.column_names == [*EVENT_COLUMNS, "surface", "category"]
    assert events.table["category"].to_pylist() == ["a,b", "c"]
    with pytest.raises(EventValidationError, match=r"log\.csv: missing column\(s\) 'user_id', 'item_id'"):
        load_events(path)
    write(path, "user_id,item_id,action,timestamp\nu,i,a,1\nu,i,a,oops\n")
    with pytest.raises(EventValidationError, match=r"log\.csv, line 3, column 'timestamp': value 'oops'"):
        load_events(path)


def test_load_events_parquet(tmp_path):
    table = pa.table({"user_id": [1, 2], "item_id": ["x", "y"], "action": ["a", "b"], "timestamp": [5, -1]})
    pq.write_table(table, tmp_path / "log.parquet")
    with pytest.raises(EventValidationError, match=r"log\.parquet, row 1, column 'timestamp': value -1 is negative"):
        load_events(tmp_path / "log.parquet")
    pq.write_table(table.set_column(3, "timestamp", pa.array([5, 6])), tmp_path / "log.data")
    events = load_events(tmp_path / "log.data", format="parquet")
    assert events.table["user_id"].to_pylist() == ["1", "2"] and events.table["timestamp"].type == pa.int64()
    with pytest.raises(ValueError, match="format"):
        load_events(tmp_path / "log.data")


def test_load_dataset_by_name_unknown(tmp_path):
    with pytest.raises(ValueError, match="Unknown data set 'ml-100k'"):
        load_dataset_by_name("ml-100k", tmp_path)
    assert DEFAULT_POSITIVE_ACTIONS["ml-1m"] == ("rating_4", "rating_5")


def test_ml1m_counts(ml1m_events):
    assert len(ml1m_events) == ml1m_events.num_rows_read == 1_000_209
    assert ml1m_events.num_duplicates_dropped == 0
    summary = ml1m_events.summary()
    assert (summary["users"], summary["items"]) == (6_040, 3_706)
    assert summary["actions"] == {"rating_1": 56_174, "rating_2": 107_557, "rating_3": 261_197,
                                  "rating_4": 348_971, "rating_5": 226_310}
    assert pc.sum(pc.is_null(ml1m_events.table["genre"])).as_py() == 0  # genres joined for every event
    assert ml1m_events.table.slice(0, 1).to_pylist()[0] == {
        "user_id": "1m_1", "item_id": "One Flew Over the Cuckoo's Nest (1975)", "action": "rating_5",
        "timestamp": 978300760, "genre": "Drama"}


def test_ml1m_load_time(shared_data_dir):
    start = time.perf_counter()
    load_dataset_by_name("ml-1m", shared_data_dir)
    assert time.perf_counter() - start < 5.0  # ~1 s on 2 cores; generous for CI noise


def test_ml1m_users(shared_data_dir):
    users = load_movielens_users(shared_data_dir / "ml-1m")
    assert users.column_names == ["user_id", "age", "gender", "occupation"]
    assert users.num_rows == 6_040 and all(pa.types.is_string(t) for t in users.schema.types)
    assert users.slice(0, 1).to_pylist() == [{"user_id": "1m_1", "age": "1", "gender": "F", "occupation": "10"}]


def test_taobao_counts(taobao_events, shared_data_dir):
    assert len(taobao_events) == taobao_events.num_rows_read == 84_475
    summary = taobao_events.summary()
    assert (summary["users"], summary["items"]) == (815, 55_368)
    assert summary["actions"] == {"pv": 75_872, "cart": 4_497, "fav": 2_356, "buy": 1_750}
    assert pc.count_distinct(taobao_events.table["category"]).as_py() == 2_914
    assert len(load_dataset_by_name("taobao", shared_data_dir)) == 84_475


def test_load_events_from_args_columns_must_be_a_json_object(tmp_path):
    from pinfm_hf.data.loaders import load_events_from_args

    events = tmp_path / "events.csv"
    events.write_text("uid,iid,act,ts\nu1,i1,pv,10\nu1,i2,buy,20\n")
    with pytest.raises(ValueError, match="--columns must be a JSON object"):
        load_events_from_args(str(events), tmp_path, columns="{user_id: uid}")
    with pytest.raises(ValueError, match="--columns must be a JSON object"):
        load_events_from_args(str(events), tmp_path, columns='["uid"]')
    mapping = '{"user_id": "uid", "item_id": "iid", "action": "act", "timestamp": "ts"}'
    assert len(load_events_from_args(str(events), tmp_path, columns=mapping)) == 2


def test_user_features_from_args(tmp_path, shared_data_dir):
    with pytest.raises(FileNotFoundError, match="User features file .*missing.csv does not exist"):
        load_user_features_from_args(str(tmp_path / "missing.csv"), "x.csv", shared_data_dir)
    path = tmp_path / "users.csv"
    path.write_text("user_id,age\nu1,25\nu2,31\n")
    table = load_user_features_from_args(str(path), "x.csv", shared_data_dir)
    assert table.column_names == ["user_id", "age"] and table["age"].type == pa.string()
    (tmp_path / "bad.csv").write_text("uid,age\nu1,25\n")
    with pytest.raises(EventValidationError, match="bad.csv: user features need a 'user_id' column"):
        load_user_features_from_args(str(tmp_path / "bad.csv"), "x.csv", shared_data_dir)
    assert load_user_features_from_args("none", "ml-1m", shared_data_dir) is None
    assert load_user_features_from_args("auto", "taobao", shared_data_dir) is None
    assert load_user_features_from_args("auto", "ml-1m", shared_data_dir).num_rows == 6040


# ----- reliability: bad or unusual inputs -----

EVENTS_HEADER = "user_id,item_id,action,timestamp\n"


def test_load_events_millisecond_timestamps(tmp_path, caplog):
    path = write(tmp_path / "ms.csv", EVENTS_HEADER + "u1,a,view,978300760000\nu1,b,view,978300761500\n")
    with caplog.at_level(logging.WARNING):
        assert load_events(path).table["timestamp"].to_pylist() == [978300760, 978300761]
    assert "are unix milliseconds; converted to seconds. Pass --timestamp_unit ms" in caplog.text
    assert load_events(path, timestamp_unit="ms").table["timestamp"].to_pylist() == [978300760, 978300761]
    with pytest.raises(EventValidationError, match=r"ms\.csv, line 2, column 'timestamp': .*--timestamp_unit s; .*ms"):
        load_events(path, timestamp_unit="s")
    write(path, EVENTS_HEADER + "u1,a,view,978300760\nu1,b,view,978300761500\n")
    with pytest.raises(EventValidationError, match=r"ms\.csv, line 2, column 'timestamp': .*units are mixed; set --timestamp_unit"):
        load_events(path)


def test_timestamp_unit_flag(tmp_path):
    path = write(tmp_path / "ms.csv", EVENTS_HEADER + "u1,a,view,978300760000\nu1,b,view,978300761500\n")
    args = EventSourceArguments(dataset=str(path), timestamp_unit="ms")
    assert args.load_events().table["timestamp"].to_pylist() == [978300760, 978300761]
    with pytest.raises(EventValidationError, match="--timestamp_unit s"):
        load_events_from_args(str(path), tmp_path, timestamp_unit="s")
    with pytest.raises(ValueError, match=r"`timestamp_unit` \('seconds'\) must be one of .*\(--timestamp_unit\)"):
        load_events_from_args("ml-1m", tmp_path, timestamp_unit="seconds")
    help_text = EventSourceArguments.__dataclass_fields__["timestamp_unit"].metadata["help"]
    assert "auto" in help_text and "ms" in help_text


def test_parquet_timestamp_type(tmp_path):
    table = pa.table({"user_id": ["u1", "u1"], "item_id": ["a", "b"], "action": ["v", "v"],
                      "timestamp": pa.array([978300760000000, 978300761000000], pa.timestamp("us"))})
    pq.write_table(table, tmp_path / "log.parquet")
    assert load_events(tmp_path / "log.parquet").table["timestamp"].to_pylist() == [978300760, 978300761]


@pytest.mark.parametrize(
    "name, data",
    [
        ("bom.csv", b"\xef\xbb\xbf" + b"user_id,item_id,action,timestamp\nu1,a,view,1\nu1,\"b, c\",view,2\n"),
        ("excel.csv", b'\xef\xbb\xbf"user_id","item_id","action","timestamp"\r\n"u1","a","view","1"\r\n"u1","b, c","view",2\r\n'),
        ("r.csv", b'"","user_id","item_id","action","timestamp"\n"1","u1","a","view",1\n"2","u1","b, c","view",2\n'),
        ("quoted.tsv", b'"user_id"\t"item_id"\t"action"\t"timestamp"\n"u1"\t"a"\t"view"\t1\n"u1"\t"b, c"\tview\t2\n'),
        ("excel.tsv", b'\xef\xbb\xbf"user_id"\titem_id\taction\ttimestamp\r\nu1\ta\tview\t1\r\nu1\t"b, c"\tview\t2\r\n'),
    ],
)
def test_bom_and_quoted_headers(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    events = load_events(tmp_path / name)
    assert events.table.to_pylist() == [
        {"user_id": "u1", "item_id": "a", "action": "view", "timestamp": 1},
        {"user_id": "u1", "item_id": "b, c", "action": "view", "timestamp": 2},
    ]


def test_compressed_csv(tmp_path):
    (tmp_path / "log.csv.gz").write_bytes(gzip.compress((EVENTS_HEADER + "u1,a,view,1\nu1,b,view,2\n").encode()))
    assert len(load_events(tmp_path / "log.csv.gz")) == 2
    (tmp_path / "bad.csv.gz").write_bytes(gzip.compress((EVENTS_HEADER + "u1,a,view,1\nu1,b,view\n").encode()))
    with pytest.raises(EventValidationError, match=r"bad\.csv\.gz, line 3: expected 4 fields separated by ',', got 3"):
        load_events(tmp_path / "bad.csv.gz")
    (tmp_path / "log.parquet.gz").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"log\.parquet\.gz: Parquet compresses inside the file"):
        load_events(tmp_path / "log.parquet.gz")
    with pytest.raises(ValueError, match=r"Cannot tell the format of .*log\.xlsx: expected CSV/TSV files"):
        load_events(write(tmp_path / "log.xlsx", "x"))


def test_generic_atomic_inter(tmp_path, caplog):
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    path = write(tmp_path / "x.inter", header + 'u1\t"Q" (1999)\t5\t10\nu1\tb\t3.5\t11\n')
    events = load_events(path)
    assert events.table["action"].to_pylist() == ["rating_5", "rating_3.5"]
    assert events.table["item_id"].to_pylist() == ['"Q" (1999)', "b"]  # no quoting in atomic files
    write(path, "uid:token\tiid:token\tts:float\nu1\ta\t10\nu1\tb\t11\n")
    events = load_events(path, columns={"user_id": "uid", "item_id": "iid", "timestamp": "ts"})
    assert events.table["action"].to_pylist() == ["interact", "interact"]
    write(path, "uid:token\tiid:token\tts:float\tkind:token\nu1\ta\t10\tclick\nu1\tb\t11\n")
    with pytest.raises(EventValidationError, match=r"x\.inter, line 3: expected 4 fields separated by '\\t', got 3"):
        load_events(path, columns={"user_id": "uid", "item_id": "iid", "timestamp": "ts", "action": "kind"})
    assert len(load_events_from_args(str(write(tmp_path / "y.inter", header + "u1\ta\t4\t10\n")), tmp_path)) == 1


def test_dataset_argument_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--dataset 'ml-100k' is neither a known data set nor an existing file; "
                       r"accepted: the known data sets \(ml-1m, taobao, amazon-sports, sports\), CSV/TSV .*\.inter"):
        load_events_from_args("ml-100k", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"is a folder holding no event file: name one file; accepted:"):
        load_events_from_args(str(tmp_path), tmp_path)
    write(tmp_path / "a.csv", EVENTS_HEADER + "u1,a,view,1\n")
    write(tmp_path / "notes.md", "x")
    assert len(load_events_from_args(str(tmp_path), tmp_path)) == 1  # the only event file of the folder
    write(tmp_path / "b.tsv", "x")
    with pytest.raises(FileNotFoundError, match=r"is a folder holding 2 event files \(a\.csv, b\.tsv\): name one file"):
        load_events_from_args(str(tmp_path), tmp_path)
    with pytest.raises(ValueError, match="--columns applies to event files of your own, not to the known data set 'taobao'"):
        load_events_from_args("taobao", tmp_path, columns='{"user_id": "u"}')


def test_amazon_sports_by_name(shared_data_dir):
    events = load_events_from_args("sports", shared_data_dir)
    assert events.summary()["users"] == 35_598 and events.summary()["actions"] == {"review": 296_337}
    assert DEFAULT_POSITIVE_ACTIONS["amazon-sports"] == DEFAULT_POSITIVE_ACTIONS["sports"] == ("review",)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", r"empty\.csv: the file is empty \(expected a header line naming the columns\)"),
        ("\n", r"empty\.csv, line 1: empty header line"),
        (EVENTS_HEADER, r"empty\.csv: no events \(zero rows\)"),
    ],
)
def test_empty_files(tmp_path, text, expected):
    with pytest.raises(EventValidationError, match=expected):
        load_events(write(tmp_path / "empty.csv", text))


def test_column_map_and_header_conflicts(tmp_path):
    path = write(tmp_path / "log.csv", EVENTS_HEADER + "u1,a,view,1\n")
    with pytest.raises(ValueError, match=r"log\.csv: 'user_id' and 'item_id' would both read column 'item_id'"):
        load_events(path, columns={"user_id": "item_id"})
    write(path, "user_id,item_id,action,timestamp,timestamp\nu1,a,view,1,2\n")
    with pytest.raises(EventValidationError, match=r"log\.csv, line 1: column 'timestamp' appears 2 times in the header "
                       r"\(fields 4, 5\)"):
        load_events(path)
    write(path, "user_id,item_id,action,timestamp,,\nu1,a,view,1,,\n")  # repeated empty names nobody reads
    assert len(load_events(path)) == 1
    with pytest.raises(EventValidationError, match=r"missing column\(s\) 'uid' \(for 'user_id'\)"):
        load_events(path, columns={"user_id": "uid"})


def test_delimiter_sniffing(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        events = load_events(write(tmp_path / "semi.csv", "user_id;item_id;action;timestamp\nu1;a,b;view;1\n"))
    assert events.table["item_id"].to_pylist() == ["a,b"]
    assert "the header has no ',' but has ';'" in caplog.text
    assert len(load_events(write(tmp_path / "tabs.csv", "user_id\titem_id\taction\ttimestamp\nu1\ta\tview\t1\n"))) == 1


def test_encodings(tmp_path):
    (tmp_path / "latin1.csv").write_bytes((EVENTS_HEADER + "u1,a,view,1\nu1,caf\xe9,view,2\n").encode("latin-1"))
    with pytest.raises(EventValidationError, match=r"latin1\.csv, line 3: byte 0xe9 at position 7 is not UTF-8"):
        load_events(tmp_path / "latin1.csv")
    (tmp_path / "latin1.inter").write_bytes((INTER_HEADER + "1m_1\tCaf\xe9 (1999)\t4\t1\n").encode("latin-1"))
    with pytest.raises(EventValidationError, match=r"latin1\.inter, line 2: byte 0xe9 .* is not UTF-8"):
        load_movielens_atomic(tmp_path / "latin1.inter", with_genres=False)
    (tmp_path / "utf16.csv").write_bytes((EVENTS_HEADER + "u1,a,view,1\n").encode("utf-16"))
    with pytest.raises(EventValidationError, match=r"utf16\.csv, line 1: the file looks UTF-16 encoded"):
        load_events(tmp_path / "utf16.csv")
    (tmp_path / "crlf.csv").write_bytes((EVENTS_HEADER + "u1,a,view,1\nu1,b,view,x\n").replace("\n", "\r\n").encode())
    with pytest.raises(EventValidationError, match=r"crlf\.csv, line 3, column 'timestamp': value 'x' is not a number"):
        load_events(tmp_path / "crlf.csv")


def test_quoted_csv_wrong_field_count_names_the_line(tmp_path):
    path = write(tmp_path / "log.csv", EVENTS_HEADER + 'u1,"a,b",view,1\nu1,b,view\n')
    with pytest.raises(EventValidationError, match=r"log\.csv, line 3: expected 4 fields separated by ',', got 3"):
        load_events(path)


def test_float_and_nul_ids_in_csv(tmp_path):
    events = load_events(write(tmp_path / "ids.csv", EVENTS_HEADER + "1,10,view,1\n1.0,10.0,view,2\n"))
    assert events.summary()["users"] == 1 and events.summary()["items"] == 1
    (tmp_path / "nul.csv").write_bytes((EVENTS_HEADER + "u1,a\x00b,view,1\n").encode())
    with pytest.raises(EventValidationError, match=r"nul\.csv, line 2, column 'item_id': .* holds a NUL byte"):
        load_events(tmp_path / "nul.csv")


def test_date_strings_in_csv(tmp_path):
    events = load_events(write(tmp_path / "d.csv", EVENTS_HEADER + "u1,a,view,2003-02-28 17:49:50\n"))
    assert events.table["timestamp"].to_pylist() == [1046454590]
