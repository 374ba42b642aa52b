"""`run_launched`: a child process (a recipe, `accelerate launch`) run to completion, whose hang fails a test with the
Python stack of every process it started, not a bare timeout."""

import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
# Recipe flags for two-process runs: a rank stuck in a collective fails in minutes with its traceback (the tiny test
# runs never wait that long).
DDP_TIMEOUT_FLAGS = ("--ddp_timeout", "180")


def run_launched(command: Sequence[str], *, timeout: float, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """
    `subprocess.run(command, capture_output=True, text=True)` with `HF_HUB_OFFLINE=1` and `env` added. On `timeout`,
    the child and every process under it (the ranks of `accelerate launch` run in sessions of their own) get SIGABRT,
    which `PYTHONFAULTHANDLER` turns into each one's Python traceback on stderr, and the test fails with those
    tracebacks: a distributed hang says where each rank waited.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    process = subprocess.Popen(list(command), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stuck = [process.pid, *_descendants(process.pid)]
        _signal_all(stuck, signal.SIGABRT)
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            _signal_all(stuck, signal.SIGKILL)
            stdout, stderr = process.communicate()
        raise AssertionError(f"{' '.join(command[:6])} ... still running after {timeout} s; the stacks of its "
                             f"{len(stuck)} processes at that moment:\n{stderr[-12000:]}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _descendants(pid: int) -> list[int]:
    """The processes under `pid`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it ended meanwhile
        parent = int(stat[stat.rindex(")") + 2:].split()[1])  # the field after the state; the name may hold spaces
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
