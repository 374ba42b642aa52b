"""Shared pieces of the benchmark CLIs: run a recipe once (reusing a finished run), print and write the report."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional


def emit(report: dict[str, Any], output: Optional[Path]) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)


def run_once(command: list[str], results_path: Path, rerun: bool, cwd: Path) -> dict:
    """Run a recipe `command` unless its `results_path` exists already (or `rerun`), then return those results."""
    if rerun or not results_path.exists():
        print("$", " ".join(command), file=sys.stderr, flush=True)
        subprocess.run(command, cwd=cwd, check=True)
    return json.loads(results_path.read_text())
