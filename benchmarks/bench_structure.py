"""Code-structure figures of a checkout, and of another git revision beside it: what a newcomer meets.

    python benchmarks/bench_structure.py --before cd208f5 --run_tests --output benchmarks/results/structure.json

For each tree (the working tree as "after", `--before REV` checked out into a temporary worktree): the largest file
under src/ and the largest function under src/, recipes/ and benchmarks/ (lines, from `ast`), the count of
repeated-code pairs (six or more shared lines, same or same-shaped) reported by the `duplicates` command in the whole
tree and in src/ + recipes/ + benchmarks/ alone (needs that command on PATH; null without it), the `sys.path`
insertions outside tests/conftest.py, and the test count (`pytest --collect-only`); with `--run_tests`, the suite's
wall time too, each tree with its own `.venv` (made by its `scripts/setup.sh` where missing, untimed) as CI runs it;
both trees run one after the other, so compare them within one invocation.
"""

import argparse
import ast
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from _report import emit  # benchmarks/ is on sys.path when a script runs


ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("src", "recipes", "benchmarks")
SYS_PATH = re.compile(r"sys\.path\.(insert|append)\(")


def python_files(root: Path, dirs=CODE_DIRS) -> list[Path]:
    return sorted(p for d in dirs for p in (root / d).rglob("*.py") if "__pycache__" not in p.parts)


def largest_function(files: list[Path], root: Path) -> tuple[int, str]:
    best = (0, "")
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                best = max(best, (length, f"{path.relative_to(root)}:{node.lineno} {node.name}"))
    return best


def duplicate_pairs(root: Path, only: Optional[tuple[str, ...]] = None) -> Optional[int]:
    """Pairs the `duplicates` command reports (its first line counts them); None when the command is missing."""
    if shutil.which("duplicates") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        target = root
        if only:  # a plain folder of just those directories (not a git checkout: every file counts)
            target = Path(tmp) / "tree"
            for name in only:
                shutil.copytree(root / name, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.json"))
        first = subprocess.run(["duplicates", "--repo", str(target), "--seconds", "120"], capture_output=True, text=True).stdout
    match = re.match(r"(\d+) pairs", first)
    return int(match.group(1)) if match else 0


def pytest_run(root: Path, run: bool) -> dict[str, Any]:
    """Collect (and with `run`, run and time) the tree's suite as CI does: its own `.venv` (made by its `scripts/setup.sh`
    first, untimed, where missing), so that recipe and hub child processes import that tree's package."""
    python = root / ".venv" / "bin" / "python"
    if not python.is_file():
        subprocess.run(["bash", "scripts/setup.sh"], cwd=root, check=True, capture_output=True)
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin",
           "HOME": str(Path.home())}
    collected = subprocess.run([str(python), "-m", "pytest", "tests", "--collect-only", "-q", "-p", "no:cacheprovider"],
                               cwd=root, capture_output=True, text=True, env=env).stdout
    match = re.search(r"(\d+) tests? collected", collected)
    figures: dict[str, Any] = {"test_count": int(match.group(1)) if match else None, "test_wall_s": None, "tests_passed": None}
    if run:
        start = time.time()
        result = subprocess.run([str(python), "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider"], cwd=root,
                                capture_output=True, text=True, env=env)
        figures["test_wall_s"] = round(time.time() - start, 1)
        tail = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        figures["tests_passed"] = result.returncode == 0
        figures["test_summary"] = tail
    return figures


def measure(root: Path, run_tests: bool) -> dict[str, Any]:
    src_files = python_files(root, ("src",))
    largest_file = max(src_files, key=lambda p: len(p.read_text(encoding="utf-8").splitlines()))
    function_lines, function_name = largest_function(python_files(root), root)
    sys_path = [
        f"{p.relative_to(root)}:{n}" for p in sorted(root.rglob("*.py"))
        if ".venv" not in p.parts and p.relative_to(root).as_posix() != "tests/conftest.py"
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1) if SYS_PATH.search(line)
    ]
    return {
        "largest_file": str(largest_file.relative_to(root)),
        "largest_file_lines": len(largest_file.read_text(encoding="utf-8").splitlines()),
        "largest_function": function_name,
        "largest_function_lines": function_lines,
        "src_files_over_700_lines": sum(len(p.read_text(encoding="utf-8").splitlines()) > 700 for p in src_files),
        "duplicate_pairs_whole_tree": duplicate_pairs(root),
        "duplicate_pairs_src_recipes_benchmarks": duplicate_pairs(root, CODE_DIRS),
        "sys_path_insertions": len(sys_path),
        "sys_path_insertion_sites": sys_path,
        **pytest_run(root, run_tests),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=None, help="A git revision to measure beside the working tree.")
    parser.add_argument("--run_tests", action="store_true", help="Also run each tree's test suite for its wall time.")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    report: dict[str, Any] = {"after": None, "before": None, "before_revision": args.before}
    if args.before:
        # A sibling of this checkout, so that its tests find ../shared/data as this checkout's do.
        worktree = ROOT.parent / f".structure-before-{args.before}"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.before],
                       check=True, capture_output=True)
        try:
            report["before"] = measure(worktree, args.run_tests)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], capture_output=True)
    report["after"] = measure(ROOT, args.run_tests)
    emit(report, args.output)


if __name__ == "__main__":
    main()
