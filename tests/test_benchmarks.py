"""Every benchmark script imports and answers `--help` (an import broken by a package change fails here, not in a
benchmark run weeks later). `tests/conftest.py` puts `benchmarks/` on the path, as running a script there does."""

import importlib
import sys
from pathlib import Path

import pytest


BENCHMARKS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("bench_*.py"))


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_help(name, monkeypatch, capsys):
    module = importlib.import_module(name)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
