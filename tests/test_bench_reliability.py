"""`benchmarks/bench_reliability.py`: a few of its fastest cases run for real, the report keeps its schema, and the
judge classifies by what it observed (a wrong message or an unchecked result is never counted as handled)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import bench_reliability
from bench_reliability import judge


ROOT = Path(__file__).resolve().parents[1]
# One recovered and one error data case, a tokenizer error, a model recovery: all in-process, no recipe run.
EXPECTED = {
    "ms_timestamps": "recovered",
    "latin1_bytes": "error",
    "encode_events_bool_id": "error",
    "all_padding_row": "recovered",
}


def test_fast_cases_run_and_write_the_report(tmp_path, shared_data_dir):
    output = tmp_path / "reliability.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_reliability.py", "--only", *EXPECTED, "--output", str(output),
         "--work_dir", str(tmp_path / "work"), "--data_dir", str(shared_data_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert {c["name"]: c["outcome"] for c in report["cases"]} == EXPECTED, report["cases"]
    for c in report["cases"]:
        assert set(c) >= {"name", "category", "command", "expect", "outcome", "detail", "seconds"}
        assert c["outcome"] in ("error", "recovered", "silent") and c["category"] in bench_reliability.CATEGORIES
        assert c["detail"] and c["expect"] and c["command"]
    assert report["counts"] == {"error": 2, "recovered": 2, "silent": 0}
    assert re.fullmatch(r"[0-9a-f]{40}", report["commit"])
    assert "| latin1_bytes | data | error |" in result.stderr  # the Markdown table
    # The command is the snippet that ran: pasted into Python in an empty folder, it fails the same way.
    latin1 = next(c for c in report["cases"] if c["name"] == "latin1_bytes")
    pasted = subprocess.run([sys.executable, "-c", latin1["command"]], cwd=tmp_path, env=env, capture_output=True,
                            text=True)
    assert pasted.returncode != 0 and "latin1.csv, line 3: byte 0xe9" in pasted.stderr


def test_judge_classifies_what_it_observed():
    no_check = [("never true", lambda: False)]
    assert judge(True, "ValueError: x.csv, line 3: bad", words=["line 3"])[0] == "error"
    assert judge(True, "ValueError: something went wrong", words=["line 3"])[0] == "silent"  # lacks the words
    assert judge(True, "ValueError: line 3", words=["line 3"], after=no_check)[0] == "silent"  # but left outputs
    assert judge(True, "ValueError: line 3", checks=[])[0] == "silent"  # it should have recovered
    assert judge(False, "", words=["line 3"])[0] == "silent"  # exit 0 where an error was due
    assert judge(False, "", checks=no_check)[0] == "silent"  # finished with a wrong result
    assert judge(False, "", checks=[("ok", lambda: True)]) == ("recovered", "ok", "recovered: ok")
    raising = [("reads the log", lambda: 1 / 0)]
    outcome, detail, _ = judge(False, "", checks=raising)
    assert outcome == "silent" and "ZeroDivisionError" in detail  # a check that cannot run is a failed check


def test_case_names_are_unique_snake_case_with_a_known_category():
    names = [c.name for c in bench_reliability.CASES]
    assert len(names) == len(set(names)) >= 60
    assert all(re.fullmatch(r"[a-z0-9_]+", n) for n in names)
    assert {c.category for c in bench_reliability.CASES} == set(bench_reliability.CATEGORIES)
