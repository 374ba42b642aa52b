"""Reliability: every bad input and fault we know of, run for real, each classified by what it actually did.

    python benchmarks/bench_reliability.py --output benchmarks/results/reliability.json     # all cases, 10-14 min
    python benchmarks/bench_reliability.py --only ms_timestamps empty_file --work_dir /tmp/rel
    python benchmarks/bench_reliability.py --list

Each case feeds one bad input or injects one fault (a bad file, flag or call, a damaged checkpoint, a `kill -9` at a
named point of a save) and is judged on what happened, never on what it is supposed to do:
- `error`: the command exited non-zero (or the call raised) and the message holds the expected words, which name the
  field, flag, file, line or step at fault (and, where it matters, nothing was left behind);
- `recovered`: it finished and an explicit check of the result passed (it resumed and reproduced the uninterrupted
  run's losses, converted the units with a notice, ranked the NaN target last, ...);
- `silent`: anything else: a wrong result with exit 0, or a failure whose message lacks the expected words.

Recipe cases run `recipes/*.py` as subprocesses (from the repository root, this checkout's `src/` first on
PYTHONPATH, `HF_HUB_OFFLINE=1`) with the tiny configs; fixtures (an uninterrupted reference run, a run stopped after
step 4, a base pretrained before the CTR cut, a loopback hub from `tests/hub_server.py`) are made once, when a
selected case first needs them. Library cases execute their `command`, a self-contained Python snippet, in-process
with the work dir as the current directory. `$WORK` in a command stands for the work dir. Every input file is
generated there (seeded). Prints a Markdown table to stderr and the JSON report to stdout (and `--output`).
"""

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import pinfm_hf
from pinfm_hf.checkpointing import FAULT_ENV, list_checkpoints, read_training_state
from pinfm_hf.training_utils import read_jsonl

from _report import emit  # benchmarks/ is on sys.path when a script runs


ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data"
TINY = "recipes/configs/tiny_test.yaml"
CTR_TINY = "recipes/configs/ctr_tiny_test.yaml"
# Checkpoints every 2 of the 8 steps (as tests/test_faults.py), so that faults land between several of them.
FLAGS = ("--checkpointing_steps", "2", "--checkpoints_total_limit", "2")
STEPS = list(range(1, 9))
LOSS_RTOL = 1e-5
FIXTURES = ("reference", "stopped", "base", "ctr_reference", "hub")
CATEGORIES = ("data", "cli", "run_folder", "checkpoint", "divergence", "hub", "model_api", "pipeline", "tokenizer",
              "evaluation")
OUTCOMES = ("error", "recovered", "silent")
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Exit|Warning)\b(?::|$)")

# A check is (description, function); process checks take no argument, snippet checks take the `Snippet`.
Check = tuple[str, Callable[..., bool]]


@dataclass
class Case:
    name: str
    category: str
    short: str
    run: Callable[["Bench"], tuple[str, str, str]]  # -> (outcome, detail, expect)
    in_process: bool = False  # runs code in this process (cwd, log capture): one at a time, in the main thread


@dataclass
class Snippet:
    """What an in-process snippet left: its namespace, the exception it raised (or None), its warnings."""

    ns: dict[str, Any]
    error: Optional[BaseException]
    log: str


CASES: list[Case] = []


def case(name: str, category: str, short: str, in_process: bool = False):
    """Register a case function `fn(bench) -> (outcome, detail, expect)`."""
    assert category in CATEGORIES and re.fullmatch(r"[a-z0-9_]+", name), (name, category)

    def register(fn):
        assert name not in {c.name for c in CASES}, name
        CASES.append(Case(name, category, short, fn, in_process))
        return fn

    return register


# ----- judging ---------------------------------------------------------------------------------------------------


def first_line(text: str, limit: int = 400) -> str:
    line = next((l.strip() for l in text.splitlines() if l.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def error_message(stderr: str) -> str:
    """The last exception of a traceback (or argparse's `error:` line) and what follows it."""
    lines = stderr.splitlines()
    for i in reversed(range(len(lines))):
        if _EXCEPTION_LINE.match(lines[i]) or ": error: " in lines[i]:
            return "\n".join(lines[i:]).strip()
    return "\n".join(l for l in lines[-3:] if l.strip())


def _run_checks(checks: list[Check], *args) -> list[tuple[str, bool]]:
    """Each check's description (with the measured value when it returns `(ok, value)`) and whether it held."""
    results = []
    for description, fn in checks:
        try:
            ok = fn(*args)
            if isinstance(ok, tuple):
                ok, measured = ok
                description = f"{description} ({measured})"
            ok = bool(ok)
        except Exception as e:  # a check that cannot even be computed failed
            ok, description = False, f"{description} (check raised {type(e).__name__}: {first_line(str(e), 120)})"
        results.append((description, ok))
    return results


def describe_expectation(words: Optional[list[str]], after: list[Check], checks: Optional[list[Check]]) -> str:
    parts = []
    if words is not None:
        parts.append("error naming " + ", ".join(repr(w) for w in words))
        if after:
            parts[-1] += "; then " + "; ".join(d for d, _ in after)
    if checks is not None:
        parts.append("recovered: " + "; ".join(d for d, _ in checks))
    return " | or ".join(parts)


def judge(
    failed: bool,
    message: str,
    *,
    words: Optional[list[str]] = None,
    after: tuple[Check, ...] = (),
    checks: Optional[list[Check]] = None,
    check_args: tuple = (),
    failure_note: str = "",
) -> tuple[str, str, str]:
    """
    Classify one observation. `words`: what a clear error must say (None: an error is not acceptable here); `after`:
    what must hold after that error (nothing written, ...); `checks`: what a correct recovery must satisfy (None:
    finishing is not acceptable here).
    """
    expect = describe_expectation(words, list(after), checks)
    if failed:
        line = first_line(message)
        if words is None:
            return "silent", f"failed where it should recover{failure_note}: {line}", expect
        missing = [w for w in words if w not in message]
        if missing:
            return "silent", f"failed{failure_note} without naming {missing}: {line}", expect
        broken = [d for d, ok in _run_checks(list(after), *check_args) if not ok]
        if broken:
            return "silent", f"{line} -- but not: {'; '.join(broken)}", expect
        return "error", line, expect
    if checks is None:
        return "silent", "finished without an error" + (f" ({message})" if message else ""), expect
    results = _run_checks(checks, *check_args)
    broken = [d for d, ok in results if not ok]
    if broken:
        return "silent", "finished, but not: " + "; ".join(broken), expect
    return "recovered", "; ".join(d for d, _ in results), expect


def judge_process(proc: subprocess.CompletedProcess, **kwargs) -> tuple[str, str, str]:
    failed = proc.returncode != 0
    note = f" (exit {proc.returncode})" if failed else ""
    return judge(failed, error_message(proc.stderr) if failed else "", failure_note=note, **kwargs)


def judge_snippet(snippet: Snippet, **kwargs) -> tuple[str, str, str]:
    error = snippet.error
    message = f"{type(error).__name__}: {error}" if error is not None else ""
    return judge(error is not None, message, check_args=(snippet,), **kwargs)


# ----- the bench: fixtures, recipe runs, snippets ----------------------------------------------------------------


class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class Bench:
    """
    What the cases share: the work dir, the data, the fixtures (built once, under a lock, as recipe cases run in
    threads) and the loopback hub. The commands a case ran and the fixture time it waited for are per thread.
    """

    work: Path
    data_dir: Path
    fixtures: dict[str, dict[str, Any]] = field(default_factory=dict)
    _hub: Any = None
    _locks: dict[str, threading.Lock] = field(default_factory=lambda: {name: threading.Lock() for name in FIXTURES})
    _local: threading.local = field(default_factory=threading.local)

    @property
    def commands(self) -> list[str]:
        return self._local.__dict__.setdefault("commands", [])

    @commands.setter
    def commands(self, value: list[str]) -> None:
        self._local.commands = value

    @property
    def fixture_seconds(self) -> float:
        return self._local.__dict__.setdefault("fixture_seconds", 0.0)

    @fixture_seconds.setter
    def fixture_seconds(self, value: float) -> None:
        self._local.fixture_seconds = value

    # ---- display -----

    def show(self, text: str) -> str:
        """A command as a reader types it: `$WORK` for the work dir, `python` for this interpreter."""
        return text.replace(str(self.work), "$WORK").replace(sys.executable, "python").replace(f"{ROOT}/", "")

    def record(self, command: str) -> None:
        self.commands.append(self.show(command))

    # ---- subprocesses -----

    def env(self, **changes: Optional[str]) -> dict[str, str]:
        """The recipes' environment: this checkout's src/ first, offline hub, no fault injection; `None` unsets."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env.pop(FAULT_ENV, None)
        for key, value in changes.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def recipe(
        self,
        script: str,
        *args: str,
        config: Optional[str] = TINY,
        env: Optional[dict[str, Optional[str]]] = None,
        umask: Optional[int] = None,
        background: bool = False,
    ) -> subprocess.CompletedProcess:
        """Run `recipes/<script>` (with `--config config`) from the repository root; record the command."""
        argv = [sys.executable, f"recipes/{script}", *(["--config", config] if config else []), *args]
        if self.data_dir.resolve() != DEFAULT_DATA_DIR.resolve():
            argv += ["--data_dir", str(self.data_dir)]
        env = dict(env or {})
        shown = self.env_prefix(env) + shlex.join(["python", *argv[1:]])
        self.record(f"(umask {umask:03o}; {shown})" if umask is not None else shown)
        preexec = (lambda: os.umask(umask)) if umask is not None else None
        return subprocess.run(
            argv, cwd=ROOT, env=self.env(**env), capture_output=True, text=True, timeout=600, preexec_fn=preexec
        )

    @staticmethod
    def env_prefix(env: dict[str, Optional[str]]) -> str:
        """`env -u A B=1 ` for the variables a case unsets (None) or sets, as a reader would type them."""
        unset = [f"-u {k}" for k, v in env.items() if v is None]
        assigned = [f"{k}={shlex.quote(v)}" for k, v in env.items() if v is not None]
        prefix = " ".join((["env", *unset] if unset else []) + assigned)
        return prefix + " " if prefix else ""

    def python(self, code: str) -> None:
        """Run a damage/setup step in-process and record it as `python - <<'EOF' ... EOF`."""
        code = textwrap.dedent(code).strip()
        self.record(f"python - <<'EOF'\n{code}\nEOF")
        exec(compile(code, "<step>", "exec"), {"__name__": "__step__"})

    def copy(self, source: Path, target: Path) -> Path:
        self.record(f"cp -r {source} {target}")
        shutil.copytree(source, target)
        return target

    def snippet(self, code: str) -> Snippet:
        """Execute a self-contained snippet in the work dir; the snippet, as written, is the case's command."""
        code = textwrap.dedent(code).strip().replace("DATA_DIR", repr(str(self.data_dir))) + "\n"
        self.commands.append(code)
        capture = _LogCapture()
        loggers = [logging.getLogger(), logging.getLogger("transformers")]
        for logger in loggers:
            logger.addHandler(capture)
        ns: dict[str, Any] = {"__name__": "__snippet__"}
        error = None
        try:
            with self.in_work(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    exec(compile(code, "<snippet>", "exec"), ns)
                except Exception as e:
                    error = e
        finally:
            for logger in loggers:
                logger.removeHandler(capture)
        log = "\n".join([*capture.messages, *(str(w.message) for w in caught)])
        return Snippet(ns, error, log)

    @contextlib.contextmanager
    def in_work(self):
        """Snippets (and their checks) run in the work dir, where their relative paths point."""
        cwd = os.getcwd()
        os.chdir(self.work)
        try:
            yield
        finally:
            os.chdir(cwd)

    # ---- fixtures -----

    def _fixture(self, name: str, build: Callable[[], Any]) -> Any:
        """
        Build a fixture once (its time, and any wait for another thread building it, is not the case's); every case
        using it lists its commands. A fixture that failed fails every case that needs it, with its error.
        """
        start = time.time()
        with self._locks[name]:
            if name not in self.fixtures:
                outer, self.commands = self.commands, []
                try:
                    self.fixtures[name] = {"value": build()}
                except Exception as e:
                    self.fixtures[name] = {"error": f"fixture {name}: {type(e).__name__}: {e}"}
                finally:
                    built, self.commands = self.commands, outer
                    self.fixtures[name].update(commands=built, seconds=round(time.time() - start, 1))
        self.fixture_seconds += time.time() - start
        fixture = self.fixtures[name]
        for command in fixture["commands"]:
            lines = command.splitlines()
            if not lines[0].startswith("# fixture "):  # a fixture this one needs is listed as itself
                lines = [f"# fixture {name}: {lines[0]}", *(f"#   {line}" for line in lines[1:])]
            self.commands.append("\n".join(lines))
        if "error" in fixture:
            raise RuntimeError(fixture["error"])
        return fixture["value"]

    def _finished(self, proc: subprocess.CompletedProcess, what: str) -> None:
        if proc.returncode != 0:
            raise RuntimeError(f"the {what} failed (exit {proc.returncode}): {first_line(error_message(proc.stderr))}")

    def reference(self) -> Path:
        """An uninterrupted tiny pretraining run (umask 022), the yardstick of every resumed run."""

        def build() -> Path:
            out = self.work / "reference"
            self._finished(self.recipe("pretrain.py", "--output_dir", str(out), *FLAGS, umask=0o022), "reference run")
            return out

        return self._fixture("reference", build)

    def stopped(self) -> Path:
        """A tiny run stopped after step 4 (`--stop_after_steps 4`): checkpoints 2 and 4, log steps 1-4."""

        def build() -> Path:
            out = self.work / "stopped"
            proc = self.recipe("pretrain.py", "--output_dir", str(out), *FLAGS, "--stop_after_steps", "4")
            self._finished(proc, "stopped run")
            return out

        return self._fixture("stopped", build)

    def base(self) -> Path:
        """A tiny base pretrained on the events before the 0.9 time quantile, for the CTR recipe."""

        def build() -> Path:
            out = self.work / "base"
            proc = self.recipe("pretrain.py", "--output_dir", str(out), "--time_cut_quantile", "0.9")
            self._finished(proc, "base pretraining")
            return out / "model"

        return self._fixture("base", build)

    def ctr_reference(self) -> Path:
        def build() -> Path:
            out = self.work / "ctr_reference"
            proc = self.recipe("finetune_ctr.py", "--base", str(self.base()), "--output_dir", str(out), *FLAGS,
                               config=CTR_TINY)
            self._finished(proc, "CTR reference run")
            return out

        return self._fixture("ctr_reference", build)

    def hub(self) -> str:
        """A loopback hub (`tests/hub_server.py`) in a child process; returns its endpoint."""

        def build() -> str:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            storage = self.work / "hub"
            argv = [sys.executable, "tests/hub_server.py", "--port", str(port), "--storage", str(storage)]
            self.record(shlex.join(["python", *argv[1:]]) + " &")
            self._hub = subprocess.Popen(argv, cwd=ROOT, env=self.env(), stdout=subprocess.PIPE, text=True)
            line = self._hub.stdout.readline()
            if not line.startswith("HF_ENDPOINT="):
                raise RuntimeError(f"the loopback hub did not start: {line!r}")
            return line.strip().split("=", 1)[1]

        return self._fixture("hub", build)

    def close(self) -> None:
        if self._hub is not None:
            self._hub.terminate()
            self._hub.wait(timeout=30)
            self._hub = None

    # ---- run-folder helpers -----

    def steps_logged(self, out: Path) -> list[int]:
        return [r["step"] for r in read_jsonl(out / "train_log.jsonl") if "loss" in r]

    def loss_difference(self, out: Path, reference: Path) -> float:
        """Largest relative difference between the per-step losses of two runs (inf if the steps differ)."""
        ours = {r["step"]: r["loss"] for r in read_jsonl(out / "train_log.jsonl") if "loss" in r}
        theirs = {r["step"]: r["loss"] for r in read_jsonl(reference / "train_log.jsonl") if "loss" in r}
        if sorted(ours) != sorted(theirs):
            return float("inf")
        return max(abs(ours[s] - theirs[s]) / max(abs(theirs[s]), 1e-12) for s in theirs)

    def resumed_checks(self, out: Path, reference: Optional[Path] = None, steps: list[int] = STEPS) -> list[Check]:
        """The run finished as the uninterrupted reference run did: each step logged once, the same losses."""
        reference = reference or self.reference()

        def same_losses():
            diff = self.loss_difference(out, reference)
            return diff <= LOSS_RTOL, f"max rel. diff {diff:.1e}"

        return [
            (f"log holds steps {steps[0]}-{steps[-1]} once", lambda: self.steps_logged(out) == steps),
            (f"losses = uninterrupted run's within {LOSS_RTOL:g} relative", same_losses),
            ("final model saved, every tensor finite (as from_pretrained requires)", lambda: finite_file(out / "model")),
        ]


def finite_file(folder: Path) -> bool:
    """Every tensor of `folder/model.safetensors` is finite (what `from_pretrained` checks before loading)."""
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors").values()
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def checkpoint_steps(out: Path) -> list[int]:
    return [int(c.name.split("-")[1]) for c in list_checkpoints(out / "checkpoints")]


def nan_into_checkpoint(checkpoint: Path, tensor: str, index: int = 0) -> str:
    """Code that writes a NaN into one entry of a checkpoint's weights and keeps its manifest consistent."""
    return f"""
        import hashlib, json
        from safetensors.torch import load_file, save_file
        checkpoint = "{checkpoint}"
        weights = load_file(checkpoint + "/model.safetensors")
        weights["{tensor}"].view(-1)[{index}] = float("nan")
        save_file(weights, checkpoint + "/model.safetensors", metadata={{"format": "pt"}})
        state = json.load(open(checkpoint + "/training_state.json"))
        data = open(checkpoint + "/model.safetensors", "rb").read()
        state["files"]["model.safetensors"] = {{"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
        json.dump(state, open(checkpoint + "/training_state.json", "w"))
    """


# =================================================================================================================
# A. Run folders, checkpoints, divergence, recipe flags (recipes as subprocesses)
# =================================================================================================================


@case("diverged_learning_rate", "divergence", "pretrain.py --learning_rate 1e30 --max_grad_norm 0")
def _(b: Bench):
    out = b.work / "diverged"
    proc = b.recipe("pretrain.py", "--output_dir", str(out), *FLAGS, "--learning_rate", "1e30", "--max_grad_norm", "0")
    log = out / "train_log.jsonl"
    after = [
        ("no model/", lambda: not (out / "model").exists()),
        ("no results.json", lambda: not (out / "results.json").exists()),
        ("train_log.jsonl has no NaN/Infinity token",
         lambda: "NaN" not in log.read_text() and "Infinity" not in log.read_text()),
        ("no metric logged", lambda: not any(k.startswith(("test/", "valid")) for r in read_jsonl(log) for k in r)),
    ]
    return judge_process(proc, words=["Training diverged at step", "Lower --learning_rate"], after=after)


@case("resume_nan_weights_only_checkpoint", "checkpoint", "NaN into the only checkpoint's weights; resume latest")
def _(b: Bench):
    out = b.work / "nan_only"
    b._finished(b.recipe("pretrain.py", "--output_dir", str(out), "--checkpointing_steps", "4", "--stop_after_steps", "4"),
                "stopped run")
    b.python(nan_into_checkpoint(out / "checkpoints" / "checkpoint-4", "pinfm.norm.weight"))
    proc = b.recipe("pretrain.py", "--output_dir", str(out), "--checkpointing_steps", "4",
                    "--resume_from_checkpoint", "latest")
    return judge_process(
        proc, words=["No loadable checkpoint", "checkpoint-4", "non-finite"],
        after=[("no model/ written", lambda: not (out / "model").exists())],
    )


@case("resume_nan_weights_newest_checkpoint", "checkpoint", "NaN into checkpoint-4 of 2, 4; resume latest")
def _(b: Bench):
    out = b.copy(b.stopped(), b.work / "nan_newest")
    b.python(nan_into_checkpoint(out / "checkpoints" / "checkpoint-4", "pinfm.norm.weight"))
    proc = b.recipe("pretrain.py", "--output_dir", str(out), *FLAGS, "--resume_from_checkpoint", "latest")
    warned = ("warned: skipping checkpoint-4, non-finite weights",
              lambda: "Skipping" in proc.stderr and "holds non-finite weights" in proc.stderr)
    return judge_process(proc, checks=[warned, *b.resumed_checks(out)])


def nan_buffer_resume(b: Bench, name: str, index: int) -> tuple[str, str, str]:
    out = b.copy(b.stopped(), b.work / name)
    b.python(nan_into_checkpoint(out / "checkpoints" / "checkpoint-4", "next_item_head.item_log_probs", index))
    proc = b.recipe("pretrain.py", "--output_dir", str(out), *FLAGS, "--resume_from_checkpoint", "latest")
    # Either skip the damaged checkpoint as for NaN weights, or stop naming it and what is wrong with it.
    return judge_process(proc, words=["checkpoint-4", "non-finite"], checks=b.resumed_checks(out))


@case("resume_nan_buffer_unused_entry", "checkpoint",
      "NaN into item_log_probs[0] (the padding id) of checkpoint-4; resume latest")
def _(b: Bench):
    return nan_buffer_resume(b, "nan_buffer_pad", 0)


@case("resume_nan_buffer_used_entry", "checkpoint", "NaN into item_log_probs[5] (an item) of checkpoint-4; resume latest")
def _(b: Bench):
    return nan_buffer_resume(b, "nan_buffer_item", 5)


@case("fresh_run_in_used_folder", "run_folder", "pretrain.py into a folder holding another run")
def _(b: Bench):
    out = b.copy(b.stopped(), b.work / "used")
    before = checkpoint_steps(out)
    proc = b.recipe("pretrain.py", "--output_dir", str(out), *FLAGS)
    return judge_process(
        proc, words=["holds the outputs of another run", "--overwrite_output_dir true"],
        after=[("its checkpoints untouched", lambda: checkpoint_steps(out) == before == [2, 4]),
               ("its log untouched", lambda: b.steps_logged(out) == [1, 2, 3, 4])],
    )


@case("overwrite_output_dir", "run_folder", "pretrain.py --overwrite_output_dir true into a used folder")
def _(b: Bench):
    out = b.copy(b.stopped(), b.work / "overwritten")
    old_run = read_training_state(out / "checkpoints" / "checkpoint-4")["run_id"]
    proc = b.recipe("pretrain.py", "--output_dir", str(out), *FLAGS, "--overwrite_output_dir", "true")
    return judge_process(proc, checks=[
        ("warned: deleting the old outputs", lambda: "--overwrite_output_dir: deleting" in proc.stderr),
        ("only the new run's checkpoints 6, 8 remain",
         lambda: checkpoint_steps(out) == [6, 8]
         and {read_training_state(c)["run_id"] for c in list_checkpoints(out / "checkpoints")} != {old_run}),
        *b.resumed_checks(out),
    ])


@case("concurrent_run", "run_folder", "pretrain.py into a folder another live process holds")
def _(b: Bench):
    out = b.work / "concurrent"
    code = ("import sys, time; from pinfm_hf.checkpointing import RunFolder; run = RunFolder(sys.argv[1]); run.claim(); "
            "print('held', flush=True); time.sleep(300)")
    b.record(shlex.join(["python", "-c", code, str(out)]) + " &")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], env=b.env(), stdout=subprocess.PIPE, text=True)
    try:
        if holder.stdout.readline().strip() != "held":
            raise RuntimeError("the holder process did not claim the folder")
        proc = b.recipe("pretrain.py", "--output_dir", str(out), *FLAGS)
    finally:
        holder.kill()
        holder.wait()
    return judge_process(
        proc, words=[f"{out} is in use by another run (pid {holder.pid} on"],
        after=[("nothing written (no train_log.jsonl)", lambda: not (out / "train_log.jsonl").exists())],
    )


@case("output_dir_is_a_file", "run_folder", "pretrain.py --output_dir <a file>")
def _(b: Bench):
    out = b.work / "a_file"
    b.python(f'open("{out}", "w").write("not a folder")')
    proc = b.recipe("pretrain.py", "--output_dir", str(out))
    return judge_process(proc, words=[f"--output_dir {out} is a file, not a folder"],
                         after=[("the file untouched", lambda: out.read_text() == "not a folder")])


def damaged_resume(b: Bench, name: str, damage: str, warning: str) -> tuple[str, str, str]:
    """Copy the stopped run, damage its newest checkpoint with `damage` (code), resume latest: it must fall back."""
    out = b.copy(b.stopped(), b.work / name)
    b.python(damage.replace("CHECKPOINT", repr(str(out / "checkpoints" / "checkpoint-4"))))
    proc = b.recipe("pretrain.py", "--output_dir", str(out), *FLAGS, "--resume_from_checkpoint", "latest")
    warned = (f"warned: skipping checkpoint-4 ({warning})", lambda: "Skipping" in proc.stderr and warning in proc.stderr)
    return judge_process(proc, checks=[warned, *b.resumed_checks(out)])


# The newest checkpoint damaged, then resume latest: (name, what is done, the damage (code), the warning expected).
CORRUPT_BYTES = """
path = CHECKPOINT + '/model.safetensors'
data = bytearray(open(path, 'rb').read())
data[-64:] = bytes(64)
open(path, 'wb').write(bytes(data))
"""
for name, what, damage, warning in [
    ("truncated_checkpoint_weights", "truncate checkpoint-4/model.safetensors",
     "open(CHECKPOINT + '/model.safetensors', 'r+b').truncate(100)", "model.safetensors has 100 bytes"),
    ("truncated_checkpoint_optimizer", "truncate checkpoint-4/optimizer.bin",
     "open(CHECKPOINT + '/optimizer.bin', 'r+b').truncate(1000)", "optimizer.bin has 1000 bytes"),
    ("truncated_checkpoint_state", "truncate checkpoint-4/training_state.json",
     "open(CHECKPOINT + '/training_state.json', 'r+b').truncate(30)", "no readable training_state.json"),
    ("corrupted_checkpoint_weights", "flip bytes of checkpoint-4/model.safetensors", CORRUPT_BYTES,
     "does not match its SHA-256"),
    ("checkpoint_without_state_file", "delete checkpoint-4/training_state.json",
     "import os; os.remove(CHECKPOINT + '/training_state.json')", "no readable training_state.json"),
    ("checkpoint_missing_a_file", "delete checkpoint-4/scheduler.bin",
     "import os; os.remove(CHECKPOINT + '/scheduler.bin')", "misses scheduler.bin"),
]:
    case(name, "checkpoint", f"{what}; resume latest")(
        lambda b, name=name, damage=damage, warning=warning: damaged_resume(b, name, damage, warning)
    )


@case("leftover_tmp_checkpoint", "checkpoint", "a stale .tmp-checkpoint-6 beside checkpoints 2, 4; resume latest")
def _(b: Bench):
    out = b.copy(b.stopped(), b.work / "leftover_tmp")
    tmp = out / "checkpoints" / ".tmp-checkpoint-6"
    b.python(f'import os; os.makedirs("{tmp}"); open("{tmp}/model.safetensors", "wb").write(b"half a save")')
    proc = b.recipe("pretrain.py", "--output_dir", str(out), *FLAGS, "--resume_from_checkpoint", "latest")
    return judge_process(proc, checks=[
        ("resumed from checkpoint-4", lambda: "Resumed from" in proc.stderr and "checkpoint-4 at step 4" in proc.stderr),
        ("the stale folder removed", lambda: not tmp.exists()),
        *b.resumed_checks(out),
    ])


@case("resume_explicit_incomplete_checkpoint", "checkpoint", "--resume_from_checkpoint <folder without manifest>")
def _(b: Bench):
    out = b.copy(b.stopped(), b.work / "explicit_incomplete")
    checkpoint = out / "checkpoints" / "checkpoint-4"
    b.python(f'import os; os.remove("{checkpoint}/training_state.json")')
    proc = b.recipe("pretrain.py", "--output_dir", str(out), *FLAGS, "--resume_from_checkpoint", str(checkpoint))
    return judge_process(proc, words=[f"{checkpoint} is not a complete checkpoint"],
                         after=[("no model/ written", lambda: not (out / "model").exists())])


@case("resume_explicit_damaged_checkpoint", "checkpoint", "--resume_from_checkpoint <checkpoint with truncated weights>")
def _(b: Bench):
    out = b.copy(b.stopped(), b.work / "explicit_damaged")
    checkpoint = out / "checkpoints" / "checkpoint-4"
    b.python(f'open("{checkpoint}/model.safetensors", "r+b").truncate(100)')
    proc = b.recipe("pretrain.py", "--output_dir", str(out), *FLAGS, "--resume_from_checkpoint", str(checkpoint))
    return judge_process(proc, words=[f"Cannot resume from {checkpoint}", "model.safetensors has 100 bytes"],
                         after=[("no model/ written", lambda: not (out / "model").exists())])


@case("resume_into_another_folder", "checkpoint", "--resume_from_checkpoint <other folder>/checkpoint-4 --output_dir new")
def _(b: Bench):
    source = b.copy(b.stopped(), b.work / "moved_from")
    out = b.work / "moved_to"
    proc = b.recipe("pretrain.py", "--output_dir", str(out), *FLAGS, "--resume_from_checkpoint",
                    str(source / "checkpoints" / "checkpoint-4"))
    # The new folder's log starts at step 5: the earlier steps stay in the source folder's log.
    return judge_process(proc, checks=[
        ("log holds steps 5-8 once", lambda: b.steps_logged(out) == [5, 6, 7, 8]),
        ("losses of steps 5-8 = uninterrupted run's", lambda: all(
            abs(r["loss"] - ref[r["step"]]) <= LOSS_RTOL * abs(ref[r["step"]])
            for ref in [{r["step"]: r["loss"] for r in read_jsonl(b.reference() / "train_log.jsonl") if "loss" in r}]
            for r in read_jsonl(out / "train_log.jsonl") if "loss" in r)),
        ("final model saved, every tensor finite", lambda: finite_file(out / "model")),
        ("source checkpoints untouched", lambda: checkpoint_steps(source) == [2, 4]),
    ])


def kill_then_resume(b: Bench, name: str, fault: str, left: list[int], script: str = "pretrain.py",
                     config: str = TINY, extra: tuple[str, ...] = (), reference: Optional[Path] = None):
    out = b.work / name
    killed = b.recipe(script, "--output_dir", str(out), *FLAGS, *extra, config=config, env={FAULT_ENV: fault})
    if killed.returncode != -signal.SIGKILL:
        return "silent", f"the fault {fault} did not fire (exit {killed.returncode})", f"killed by SIGKILL at {fault}"
    tmp = sorted(p.name for p in (out / "checkpoints").glob(".tmp-*"))
    found = checkpoint_steps(out)
    proc = b.recipe(script, "--output_dir", str(out), *FLAGS, *extra, "--resume_from_checkpoint", "latest", config=config)
    return judge_process(proc, checks=[
        (f"killed at {fault}, leaving checkpoints {left}",
         lambda: (found == left, f"left {found}" + (f" and {', '.join(tmp)}" if tmp else ""))),
        *b.resumed_checks(out, reference),
    ])


# kill -9 at each fault point of a pretraining run, then resume: (name, PINFM_FAULT_AT, checkpoints left, what it means).
for name, fault, left, meaning in [
    ("kill_at_step", "step@3", [2], "kill -9 mid-step"),
    ("kill_at_checkpoint_start", "checkpoint-start@4", [2], "as the save starts"),
    ("kill_at_checkpoint_files", "checkpoint-files@4", [2], "files written, no manifest"),
    ("kill_at_checkpoint_rename", "checkpoint-rename@4", [2], "manifest written, not renamed"),
    ("kill_at_checkpoint_rotate", "checkpoint-rotate@6", [2, 4, 6], "before old ones are deleted"),
]:
    case(name, "checkpoint", f"PINFM_FAULT_AT={fault} ({meaning}); resume latest")(
        lambda b, name=name, fault=fault, left=left: kill_then_resume(b, name.replace("kill_at_", "kill_"), fault, left)
    )


@case("ctr_kill_at_step", "checkpoint", "finetune_ctr.py with PINFM_FAULT_AT=step@3; resume latest")
def _(b: Bench):
    base = str(b.base())
    return kill_then_resume(b, "ctr_kill_step", "step@3", [2], script="finetune_ctr.py", config=CTR_TINY,
                            extra=("--base", base), reference=b.ctr_reference())


@case("torn_jsonl_line", "run_folder", "a torn last line in train_log.jsonl of a stopped run; resume latest")
def _(b: Bench):
    out = b.copy(b.stopped(), b.work / "torn_log")
    b.python(f"""open("{out / 'train_log.jsonl'}", "a").write('{{"step": 5, "lo')""")
    proc = b.recipe("pretrain.py", "--output_dir", str(out), *FLAGS, "--resume_from_checkpoint", "latest")
    return judge_process(proc, checks=[
        ("warned: dropping a torn line", lambda: "dropping a torn line" in proc.stderr),
        ("every line of the log parses", lambda: len(read_jsonl(out / "train_log.jsonl")) >= 8),
        *b.resumed_checks(out),
    ])


@case("file_modes_umask_022", "run_folder", "(umask 022; pretrain.py ...): modes of every saved file")
def _(b: Bench):
    out = b.reference()
    files = [p for p in [*(out / "model").rglob("*"), *(out / "checkpoints").rglob("*"), out / "results.json",
                         out / "train_log.jsonl", out / "training_curves.png"] if p.is_file()]
    odd = sorted(f"{p.relative_to(out)} {p.stat().st_mode & 0o777:o}" for p in files if p.stat().st_mode & 0o777 != 0o644)
    return judge(False, "", checks=[(f"all {len(files)} files of model/, checkpoints/ and the run are 0644"
                                     + (f" (not: {odd[:3]})" if odd else ""), lambda: files and not odd)])


def periodic_validation(b: Bench, holdout: str, name: str) -> tuple[str, str, str]:
    out = b.work / f"holdout_{holdout}"
    proc = b.recipe("pretrain.py", "--output_dir", str(out), *FLAGS, "--train_holdout", holdout, "--eval_every_epochs", "1")
    keys = lambda: {k.split("/")[0] for r in read_jsonl(out / "train_log.jsonl") for k in r if "/" in k}
    checks = [
        (f"results.json periodic_validation = {name!r}",
         lambda: json.loads((out / "results.json").read_text())["periodic_validation"] == name),
        (f"log metric prefixes = {{{name!r}, 'test'}}", lambda: keys() == {name, "test"}),
    ]
    if holdout == "1":
        checks.append(("warned: trains on the validation targets",
                       lambda: "--train_holdout 1 trains on the validation targets" in proc.stderr))
    return judge_process(proc, checks=checks)


@case("train_holdout_1_with_eval_every_epochs", "evaluation", "pretrain.py --train_holdout 1 --eval_every_epochs 1")
def _(b: Bench):
    return periodic_validation(b, "1", "valid_in_sample")


@case("train_holdout_2_with_eval_every_epochs", "evaluation", "pretrain.py --train_holdout 2 --eval_every_epochs 1")
def _(b: Bench):
    return periodic_validation(b, "2", "valid")


def flag_case(name: str, flags: list[str], words: list[str], script: str = "pretrain.py", category: str = "cli",
              config: Optional[str] = "tiny", needs_base: bool = False, short: Optional[str] = None):
    """A recipe flag that must be refused with an error naming it; nothing may be trained or written."""

    @case(name, category, short or f"{script} " + shlex.join(flags))
    def _(b: Bench):
        out = b.work / f"cli_{name}"
        extra = ["--base", str(b.base())] if needs_base else []
        proc = b.recipe(script, "--output_dir", str(out), *extra, *flags,
                        config=(CTR_TINY if script == "finetune_ctr.py" else TINY) if config == "tiny" else config)
        return judge_process(proc, words=words, after=[
            ("nothing trained (no train_log.jsonl)", lambda: not (out / "train_log.jsonl").exists())])


flag_case("checkpointing_steps_0", ["--checkpointing_steps", "0"], ["--checkpointing_steps must be > 0, got 0"])
flag_case("gradient_accumulation_steps_0", ["--gradient_accumulation_steps", "0"],
          ["--gradient_accumulation_steps must be > 0, got 0"])
flag_case("max_length_negative", ["--max_length", "-5"], ["--max_length must be > 0, got -5"])
flag_case("initial_temperature_0", ["--initial_temperature", "0"], ["--initial_temperature must be > 0, got 0.0"])
flag_case("learning_rate_nan", ["--learning_rate", "nan"], ["--learning_rate must be > 0, got nan"])
flag_case("hidden_dropout_prob_1_5", ["--hidden_dropout_prob", "1.5"], ["`hidden_dropout_prob` (1.5) must be in [0, 1)"])
flag_case("max_steps_0", ["--max_steps", "0"], ["--max_steps must be -1", "got 0"])
flag_case("train_holdout_0", ["--train_holdout", "0"], ["--train_holdout must be > 0, got 0"])
flag_case("time_cut_quantile_1", ["--time_cut_quantile", "1"], ["--time_cut_quantile must be strictly between 0 and 1"])
flag_case("weight_decay_negative", ["--weight_decay", "-0.1"], ["--weight_decay must be >= 0, got -0.1"])
flag_case("batch_size_not_a_number", ["--per_device_train_batch_size", "abc"],
          ["--per_device_train_batch_size", "invalid int value: 'abc'"])
flag_case("boolean_flag_not_a_boolean", ["--full_softmax", "maybe"], ["--full_softmax", "got maybe"])
flag_case("unknown_flag", ["--hidden_sise", "32"], ["Unknown arguments", "--hidden_sise"])
flag_case("repeated_config", ["--config", TINY], ["`--config` is given 2 times"])
flag_case("missing_config_file", ["--config", "recipes/configs/no_such.yaml"],
          ["Recipe config 'recipes/configs/no_such.yaml' does not exist"], config=None,
          short="pretrain.py --config no_such.yaml")
flag_case("hub_model_id_with_space", ["--hub_model_id", "org/bad name"],
          ["--hub_model_id 'org/bad name' is not a valid repo id"])
flag_case("push_to_hub_without_repo_id", ["--push_to_hub", "true"], ["--push_to_hub needs --hub_model_id"], category="hub")
flag_case("timestamp_unit_unknown", ["--timestamp_unit", "seconds"],
          ["`timestamp_unit` ('seconds') must be one of", "--timestamp_unit"])
flag_case("full_softmax_over_limit", ["--full_softmax", "true", "--full_softmax_max_items", "100"],
          ["--full_softmax scores all", "--full_softmax_max_items (100)"])
flag_case("negative_sampling_unknown", ["--negative_sampling", "bogus"], ["--negative_sampling must be 'uniform' or 'popularity', got 'bogus'"])
flag_case("positive_actions_unknown", ["--positive_actions", "rating_5,like"], ["Unknown action 'like'"])
flag_case("ctr_use_case_unknown", ["--use_case", "likes"], ["Unknown --use_case 'likes'"], script="finetune_ctr.py",
          needs_base=True)
flag_case("ctr_cut_quantile_1_5", ["--cut_quantile", "1.5"], ["--cut_quantile must be strictly between 0 and 1, got 1.5"],
          script="finetune_ctr.py", needs_base=True)
flag_case("ctr_head_hidden_size_0", ["--ctr_head_hidden_sizes", "32", "0"],
          ["`ctr_head_hidden_sizes` ([32, 0]) must be positive"], script="finetune_ctr.py", needs_base=True)
flag_case("ctr_transfer_unknown", ["--transfer", "bogus"], ["--transfer must be one of", "got 'bogus'"],
          script="finetune_ctr.py", needs_base=True)


@case("unknown_yaml_key", "cli", "pretrain.py --config <yaml with a misspelt key>")
def _(b: Bench):
    config = b.work / "typo.yaml"
    b.python(f'open("{config}", "w").write(open("{ROOT / TINY}").read() + "hidden_sise: 32\\n")')
    out = b.work / "cli_unknown_yaml_key"
    proc = b.recipe("pretrain.py", "--output_dir", str(out), config=str(config))
    return judge_process(proc, words=[f"{config}: unknown keys ['hidden_sise']"])


@case("ctr_base_missing_folder", "cli", "finetune_ctr.py --base <no such folder>")
def _(b: Bench):
    base = b.work / "no_such_base" / "model"
    proc = b.recipe("finetune_ctr.py", "--base", str(base), "--output_dir", str(b.work / "cli_missing_base"),
                    config=CTR_TINY)
    # As every other flag error: name the flag and the value at fault.
    return judge_process(proc, words=["--base", str(base)])


@case("ctr_base_pretrained_past_the_cut", "data", "finetune_ctr.py --base <base pretrained on every event>")
def _(b: Bench):
    base = b.reference() / "model"
    out = b.work / "leaky"
    proc = b.recipe("finetune_ctr.py", "--base", str(base), "--output_dir", str(out), config=CTR_TINY)
    return judge_process(proc, words=[f"{base} was pretrained on events up to", "at or after the CTR cut",
                                      "leaked into pretraining", "--time_cut_quantile 0.9"],
                         after=[("nothing trained", lambda: not (out / "train_log.jsonl").exists())])


@case("ctr_lora_push_with_local_base", "hub", "finetune_ctr.py --transfer lora --push_to_hub true --base <folder>")
def _(b: Bench):
    base = b.reference() / "model"
    proc = b.recipe("finetune_ctr.py", "--base", str(base), "--output_dir", str(b.work / "lora_push"), "--transfer",
                    "lora", "--push_to_hub", "true", "--hub_model_id", "pinfm-test/like", config=CTR_TINY)
    return judge_process(proc, words=["needs --base to be a hub repo id", str(base)])


def push_refused_before_data(b: Bench, name: str, env: dict, words: list[str]) -> tuple[str, str, str]:
    """`pretrain.py --push_to_hub` that cannot succeed must fail at start-up, before any data is read."""
    out = b.work / name
    proc = b.recipe("pretrain.py", "--output_dir", str(out), "--push_to_hub", "true", "--hub_model_id", "pinfm-test/never",
                    env=env)
    return judge_process(proc, words=words, after=[
        ("before any data is read", lambda: "Events:" not in proc.stderr and not (out / "train_log.jsonl").exists())])


@case("push_to_hub_without_token", "hub", "pretrain.py --push_to_hub true, no HF_TOKEN, empty HF_HOME")
def _(b: Bench):
    env = {"HF_TOKEN": None, "HF_TOKEN_PATH": None, "HF_HOME": str(b.work / "hf_home_empty")}
    return push_refused_before_data(b, "push_no_token", env, ["--push_to_hub needs a hub token", "HF_TOKEN"])


@case("push_to_hub_rejected_token", "hub", "pretrain.py --push_to_hub true with a token the hub rejects")
def _(b: Bench):
    env = {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "HF_TOKEN_PATH": None, "HF_ENDPOINT": b.hub(),
           "HF_HOME": str(b.work / "hf_home_bad"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": "hf_not_the_right_token"}
    return push_refused_before_data(b, "push_bad_token", env, ["The hub rejected the token (HTTP 401)", "HF_TOKEN"])


@case("hub_repo_not_found", "hub", "cached_file_from('pinfm-test/no-such-repo', 'config.json') on the loopback hub")
def _(b: Bench):
    endpoint = b.hub()
    code = "from pinfm_hf.hub import cached_file_from; cached_file_from('pinfm-test/no-such-repo', 'config.json')"
    changes = {"HF_HUB_OFFLINE": None, "HF_TOKEN": None, "HF_TOKEN_PATH": None, "HF_ENDPOINT": endpoint,
               "HF_HOME": str(b.work / "hf_home_read"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    b.record(b.env_prefix(changes) + shlex.join(["python", "-c", code]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=b.work, env=b.env(**changes), capture_output=True, text=True,
                          timeout=300)
    return judge_process(proc, words=["'pinfm-test/no-such-repo'", "'config.json'"])


@case("every_user_one_event", "data", "pretrain.py --dataset <CSV where every user has one event>")
def _(b: Bench):
    path = b.work / "one_event_each.csv"
    b.python(f"""
        rows = ["user_id,item_id,action,timestamp"] + [f"u{{i}},item{{i % 7}},view,{{1600000000 + i}}" for i in range(50)]
        open("{path}", "w").write("\\n".join(rows) + "\\n")
    """)
    proc = b.recipe("pretrain.py", "--output_dir", str(b.work / "one_event_run"), "--dataset", str(path))
    return judge_process(proc, words=["No user has 2 or more events", "50 users, 50 events"])


@case("dataset_folder_with_one_file", "data", "pretrain.py --dataset <folder holding events.csv + notes.md>")
def _(b: Bench):
    folder = b.work / "own_events"
    b.python(f"""
        import os, random
        rng = random.Random(0)
        os.makedirs("{folder}")
        rows = ["user_id,item_id,action,timestamp"]
        for user in range(120):
            start = 1600000000 + rng.randrange(10**6)
            for k in range(15):
                rows.append(f"u{{user}},item{{rng.randrange(200)}},{{rng.choice(['view', 'buy'])}},{{start + 60 * k}}")
        open("{folder}/events.csv", "w").write("\\n".join(rows) + "\\n")
        open("{folder}/notes.md", "w").write("exported 2026-12-01\\n")
    """)
    out = b.work / "own_events_run"
    proc = b.recipe("pretrain.py", "--output_dir", str(out), "--dataset", str(folder), "--max_steps", "2",
                    "--checkpointing_steps", "2")
    return judge_process(proc, checks=[
        ("noticed: reading its only event file, events.csv",
         lambda: "reading its only event file, events.csv" in proc.stderr),
        ("results.json: 120 test users",
         lambda: json.loads((out / "results.json").read_text())["test"]["num_users"] == 120),
        ("model/ saved", lambda: (out / "model" / "model.safetensors").is_file()),
    ])


# =================================================================================================================
# B. Data files and loaders (in-process: the snippet is the command)
# =================================================================================================================


def snippet_case(name: str, category: str, short: str, code: str, *, words=None, after=(), checks=None,
                 needs: tuple[str, ...] = ()):
    """A library call judged in-process: `words` for a clear error, `checks` (on the `Snippet`) for a recovery."""

    @case(name, category, short, in_process=True)
    def _(b: Bench):
        for fixture in needs:
            getattr(b, fixture)()
        snippet = b.snippet(code)
        expected = words(snippet.ns) if callable(words) else words
        with b.in_work():
            return judge_snippet(snippet, words=expected, after=after, checks=checks)


def code(*parts: str) -> str:
    """One snippet from several parts, each dedented on its own."""
    return "".join(textwrap.dedent(part).strip("\n") + "\n" for part in parts)


def file_snippet(filename: str, content, load: Optional[str] = None, imports: str = "load_events") -> str:
    """Write `content` (text or bytes) to `filename`, then load it (`events = load_events(filename)` by default)."""
    if isinstance(content, bytes):
        write = f"Path({filename!r}).write_bytes({content!r})"
    else:
        write = f"Path({filename!r}).write_text({content!r}, encoding='utf-8')"
    load = load or f"events = load_events({filename!r})"
    return f"from pathlib import Path\nfrom pinfm_hf.data import {imports}\n{write}\n{load}\n"


H = "user_id,item_id,action,timestamp\n"
ROWS_OK = [{"user_id": "u1", "item_id": "a", "action": "view", "timestamp": 1},
           {"user_id": "u1", "item_id": "b, c", "action": "view", "timestamp": 2}]


def rows(s: Snippet) -> list[dict]:
    return s.ns["events"].table.select(["user_id", "item_id", "action", "timestamp"]).to_pylist()


def timestamps(s: Snippet) -> list[int]:
    return s.ns["events"].table["timestamp"].to_pylist()


for unit, (factor, unit_name) in {"ms": (10**3, "milliseconds"), "us": (10**6, "microseconds"),
                                  "ns": (10**9, "nanoseconds")}.items():
    snippet_case(
        f"{unit}_timestamps", "data", f"load_events(<CSV of unix {unit_name}>)",
        file_snippet(f"{unit}.csv", H + f"u1,a,view,{978300760 * factor}\nu1,b,view,{978300761 * factor + factor // 2}\n"),
        checks=[("timestamps converted to seconds [978300760, 978300761]",
                 lambda s: timestamps(s) == [978300760, 978300761]),
                (f"notice: are unix {unit_name}; converted to seconds",
                 lambda s, n=unit_name: f"are unix {n}; converted to seconds" in s.log)],
    )

snippet_case("mixed_timestamp_units", "data", "load_events(<seconds on line 2, milliseconds on line 3>)",
             file_snippet("mixed.csv", H + "u1,a,view,978300760\nu1,b,view,978300761500\n"),
             words=["mixed.csv, line 2, column 'timestamp'", "units are mixed", "--timestamp_unit"])
snippet_case("explicit_seconds_with_ms_values", "data", 'load_events(<ms values>, timestamp_unit="s")',
             file_snippet("ms_as_s.csv", H + "u1,a,view,978300760000\nu1,b,view,978300761500\n",
                          'events = load_events("ms_as_s.csv", timestamp_unit="s")'),
             words=["ms_as_s.csv, line 2, column 'timestamp'", "--timestamp_unit s", "looks like unix milliseconds"])
snippet_case(
    "parquet_timestamp_ms_column", "data", "load_events(<Parquet, timestamp[ms] column>)",
    """
    import pyarrow as pa, pyarrow.parquet as pq
    from pinfm_hf.data import load_events
    pq.write_table(pa.table({"user_id": ["u1", "u1"], "item_id": ["a", "b"], "action": ["view", "view"],
                             "timestamp": pa.array([978300760000, 978300761500], pa.timestamp("ms"))}), "ts_ms.parquet")
    events = load_events("ts_ms.parquet")
    """,
    checks=[("timestamps in seconds [978300760, 978300761]", lambda s: timestamps(s) == [978300760, 978300761])],
)
for name, short, filename, data in [
    ("utf8_bom_csv", "load_events(<UTF-8 CSV with a BOM>)", "bom.csv",
     b"\xef\xbb\xbf" + b'user_id,item_id,action,timestamp\nu1,a,view,1\nu1,"b, c",view,2\n'),
    ("excel_quoted_header", "load_events(<Excel CSV: BOM, quoted header, CRLF>)", "excel.csv",
     b'\xef\xbb\xbf"user_id","item_id","action","timestamp"\r\n"u1","a","view","1"\r\n"u1","b, c","view",2\r\n'),
    ("r_write_csv_row_names", "load_events(<R write.csv with row names>)", "r.csv",
     b'"","user_id","item_id","action","timestamp"\n"1","u1","a","view",1\n"2","u1","b, c","view",2\n'),
    ("quoted_tsv", "load_events(<TSV with quoted fields>)", "quoted.tsv",
     b'"user_id"\t"item_id"\t"action"\t"timestamp"\n"u1"\t"a"\t"view"\t1\n"u1"\t"b, c"\tview\t2\n'),
]:
    snippet_case(name, "data", short, file_snippet(filename, data),
                 checks=[("rows read as [u1 a view 1, u1 'b, c' view 2]", lambda s: rows(s) == ROWS_OK)])

snippet_case("semicolon_separated_csv", "data", "load_events(<.csv separated by ';'>)",
             file_snippet("semi.csv", "user_id;item_id;action;timestamp\nu1;a,b;view;1\n"),
             checks=[("read ';'-separated: item 'a,b'", lambda s: s.ns["events"].table["item_id"].to_pylist() == ["a,b"]),
                     ("notice: the header has no ',' but has ';'", lambda s: "the header has no ',' but has ';'" in s.log)])
snippet_case("csv_gz", "data", "load_events(<events.csv.gz>)",
             code("""
                  import gzip
                  from pathlib import Path
                  from pinfm_hf.data import load_events
                  data = b"user_id,item_id,action,timestamp\\nu1,a,view,1\\nu1,b,view,2\\n"
                  Path("events.csv.gz").write_bytes(gzip.compress(data))
                  events = load_events("events.csv.gz")
                  """),
             checks=[("2 events read", lambda s: len(s.ns["events"]) == 2)])
INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
snippet_case("recbole_inter_with_rating", "data", "load_events(<RecBole .inter with a rating column>)",
             file_snippet("x.inter", INTER + 'u1\t"Q" (1999)\t5\t10\nu1\tb\t3.5\t11\n'),
             checks=[("actions rating_5, rating_3.5",
                      lambda s: s.ns["events"].table["action"].to_pylist() == ["rating_5", "rating_3.5"]),
                     ("quotes kept as data", lambda s: s.ns["events"].table["item_id"].to_pylist() == ['"Q" (1999)', "b"])])
snippet_case("recbole_inter_without_rating", "data", "load_events(<RecBole .inter, no action/rating>, columns=...)",
             file_snippet("y.inter", "uid:token\tiid:token\tts:float\nu1\ta\t10\nu1\tb\t11\n",
                          'events = load_events("y.inter", columns={"user_id": "uid", "item_id": "iid", '
                          '"timestamp": "ts"})'),
             checks=[("every action 'interact'", lambda s: s.ns["events"].table["action"].to_pylist() == ["interact"] * 2)])
snippet_case("empty_file", "data", "load_events(<empty file>)", file_snippet("empty.csv", ""),
             words=["empty.csv: the file is empty"])
snippet_case("blank_header_line", "data", "load_events(<file holding one newline>)", file_snippet("newline.csv", "\n"),
             words=["newline.csv, line 1: empty header line"])
snippet_case("header_only", "data", "load_events(<header, no rows>)", file_snippet("header.csv", H),
             words=["header.csv: no events (zero rows)"])
snippet_case("two_names_one_column", "data", 'load_events(..., columns={"user_id": "item_id"})',
             file_snippet("log.csv", H + "u1,a,view,1\n",
                          'events = load_events("log.csv", columns={"user_id": "item_id"})'),
             words=["log.csv: 'user_id' and 'item_id' would both read column 'item_id'"])
snippet_case("duplicated_header_name", "data", "load_events(<header naming 'timestamp' twice>)",
             file_snippet("dup.csv", "user_id,item_id,action,timestamp,timestamp\nu1,a,view,1,2\n"),
             words=["dup.csv, line 1: column 'timestamp' appears 2 times"])
snippet_case("missing_column", "data", "load_events(<no timestamp column>)",
             file_snippet("no_ts.csv", "user_id,item_id,action\nu1,a,view\n"),
             words=["no_ts.csv: missing column(s) 'timestamp'"])
snippet_case("mapped_column_missing", "data", 'load_events(..., columns={"user_id": "uid"}) without uid',
             file_snippet("nouid.csv", H + "u1,a,view,1\n",
                          'events = load_events("nouid.csv", columns={"user_id": "uid"})'),
             words=["missing column(s) 'uid' (for 'user_id')"])
snippet_case("ids_1_and_1_0", "data", "load_events(<ids written 1 and 1.0>)",
             file_snippet("ids.csv", H + "1,10,view,1\n1.0,10.0,view,2\n"),
             checks=[("one user and one item",
                      lambda s: (s.ns["events"].summary()["users"], s.ns["events"].summary()["items"]) == (1, 1)),
                     ("notice: integer ids written as floats", lambda s: "integer ids written as floats" in s.log)])
snippet_case("nul_byte_in_id", "data", "load_events(<NUL byte in an item id>)",
             file_snippet("nul.csv", (H + "u1,a\x00b,view,1\n").encode()),
             words=["nul.csv, line 2, column 'item_id'", "NUL byte"])
snippet_case("latin1_bytes", "data", "load_events(<latin-1 'café' on line 3>)",
             file_snippet("latin1.csv", (H + "u1,a,view,1\nu1,caf\xe9,view,2\n").encode("latin-1")),
             words=["latin1.csv, line 3", "byte 0xe9", "is not UTF-8"])
snippet_case("utf16_file", "data", "load_events(<UTF-16 CSV>)",
             file_snippet("utf16.csv", (H + "u1,a,view,1\n").encode("utf-16")),
             words=["utf16.csv, line 1", "UTF-16"])
snippet_case("iso_date_strings", "data", "load_events(<ISO 8601 dates>)",
             file_snippet("dates.csv", H + "u1,a,view,2003-02-28 17:49:50\nu1,b,view,2003-02-28T17:49:51\n"),
             checks=[("read as unix seconds [1046454590, 1046454591]", lambda s: timestamps(s) == [1046454590, 1046454591]),
                     ("notice: dates without a time zone are read as UTC", lambda s: "are read as UTC" in s.log)])
snippet_case("mixed_dates_and_numbers", "data", "load_events(<a date on line 2, a number on line 3>)",
             file_snippet("mixed_dates.csv", H + "u1,a,view,2003-02-28\nu1,b,view,1046454600\n"),
             words=["mixed_dates.csv, line 3, column 'timestamp'", "is not an ISO 8601 date"])
snippet_case("invalid_date", "data", "load_events(<2003-02-30>)",
             file_snippet("bad_date.csv", H + "u1,a,view,2003-02-28\nu1,b,view,2003-02-30\n"),
             words=["bad_date.csv, line 3, column 'timestamp'", "'2003-02-30' is not a valid date"])
snippet_case(
    "nested_list_column_parquet", "data", "load_events(<Parquet with a list<string> item_id>)",
    """
    import pyarrow as pa, pyarrow.parquet as pq
    from pinfm_hf.data import load_events
    pq.write_table(pa.table({"user_id": ["u1", "u1"], "item_id": [["a"], ["b", "c"]], "action": ["view", "view"],
                             "timestamp": [1, 2]}), "nested.parquet")
    events = load_events("nested.parquet")
    """,
    words=["nested.parquet, column 'item_id'", "flatten it"],
)
snippet_case("not_a_parquet_file", "data", "load_events(<text saved as .parquet>)",
             file_snippet("fake.parquet", H + "u1,a,view,1\n"), words=["fake.parquet: not a readable Parquet file"])
snippet_case("quoted_csv_wrong_field_count", "data", "load_events(<quoted CSV, 3 fields on line 3>)",
             file_snippet("fields.csv", H + 'u1,"a,b",view,1\nu1,b,view\n'),
             words=["fields.csv, line 3: expected 4 fields separated by ','", "got 3"])
snippet_case("negative_timestamp", "data", "load_events(<timestamp -3 on line 3>)",
             file_snippet("neg.csv", H + "u1,a,view,1\nu1,b,view,-3\n"),
             words=["neg.csv, line 3, column 'timestamp'", "'-3' is negative"])
snippet_case("timestamp_not_a_number", "data", "load_events(<timestamp 'abc'>)",
             file_snippet("abc.csv", H + "u1,a,view,1\nu1,b,view,abc\n"),
             words=["abc.csv, line 3, column 'timestamp'", "'abc' is not a number"])
snippet_case("timestamp_too_large", "data", "load_events(<timestamp 1e20>)",
             file_snippet("huge.csv", H + "u1,a,view,1\nu1,b,view,1e20\n"), words=["huge.csv, line 3", "is too large"])
snippet_case("empty_user_id", "data", "load_events(<empty user_id on line 3>)",
             file_snippet("empty_id.csv", H + "u1,a,view,1\n,b,view,2\n"),
             words=["empty_id.csv, line 3, column 'user_id'", "is empty"])
snippet_case("blank_line", "data", "load_events(<blank line 3>)",
             file_snippet("blank.csv", H + "u1,a,view,1\n\nu1,b,view,2\n"), words=["blank.csv, line 3: the line is blank"])
snippet_case("crlf_bad_value", "data", "load_events(<CRLF file, bad timestamp on line 3>)",
             file_snippet("crlf.csv", (H + "u1,a,view,1\nu1,b,view,x\n").replace("\n", "\r\n").encode()),
             words=["crlf.csv, line 3, column 'timestamp'", "'x' is not a number"])
snippet_case("duplicate_events", "data", "load_events(<the same event 3 times>)",
             file_snippet("dups.csv", H + "u1,a,view,1\nu1,a,view,1\nu1,b,view,2\nu1,a,view,1\n"),
             checks=[("2 events kept, 2 duplicates counted",
                      lambda s: (len(s.ns["events"]), s.ns["events"].num_duplicates_dropped) == (2, 2)),
                     ("notice: dropped 2 exact duplicate event(s)",
                      lambda s: "dropped 2 exact duplicate event(s)" in s.log)])
snippet_case("unknown_file_extension", "data", "load_events(<events.xlsx>)", file_snippet("events.xlsx", "x"),
             words=["Cannot tell the format of", "events.xlsx"])
snippet_case("parquet_gz", "data", "load_events(<events.parquet.gz>)", file_snippet("events.parquet.gz", b"x"),
             words=["events.parquet.gz: Parquet compresses inside the file"])
snippet_case("taobao_unknown_behaviour", "data", "load_taobao(<behaviour 'like' on line 2>)",
             file_snippet("ub.csv", "1,10,100,pv,1511544070\n1,11,100,like,1511544071\n", "events = load_taobao('ub.csv')",
                          imports="load_taobao"),
             words=["ub.csv, line 2, column 'action'", "'like' is not a known action"])
snippet_case("movielens_rating_6", "data", "load_movielens_atomic(<rating 6 on line 3>)",
             file_snippet("mini.inter", INTER + "1m_1\tA\t4\t978300000\n1m_1\tB\t6\t978300001\n",
                          "events = load_movielens_atomic('mini.inter', with_genres=False)",
                          imports="load_movielens_atomic"),
             words=["mini.inter, line 3, column 'rating'", "'6' is not a rating in 1..5"])
snippet_case("columns_not_json", "data", "load_events_from_args(file, columns='{user_id: uid}')",
             file_snippet("cols.csv", "uid,iid,act,ts\nu1,i1,pv,10\n",
                          "events = load_events_from_args('cols.csv', '.', columns='{user_id: uid}')",
                          imports="load_events_from_args"),
             words=["--columns must be a JSON object"])
snippet_case("columns_with_named_dataset", "data", "load_events_from_args('taobao', ..., columns=...)",
             'from pinfm_hf.data import load_events_from_args\n'
             'events = load_events_from_args("taobao", DATA_DIR, columns=\'{"user_id": "u"}\')\n',
             words=["--columns applies to event files of your own, not to the known data set 'taobao'"])
snippet_case("dataset_unknown_name", "data", "load_events_from_args('ml-100k', data_dir)",
             'from pinfm_hf.data import load_events_from_args\nevents = load_events_from_args("ml-100k", DATA_DIR)\n',
             words=["--dataset 'ml-100k' is neither a known data set nor an existing file",
                    "ml-1m, taobao, amazon-sports, sports"])
snippet_case("dataset_folder_with_two_files", "data", "load_events_from_args(<folder with a.csv and b.tsv>)",
             """
             import os
             from pinfm_hf.data import load_events_from_args
             os.makedirs("two_files")
             open("two_files/a.csv", "w").write("user_id,item_id,action,timestamp\\nu1,a,view,1\\n")
             open("two_files/b.tsv", "w").write("user_id\\titem_id\\taction\\ttimestamp\\nu1\\ta\\tview\\t1\\n")
             events = load_events_from_args("two_files", ".")
             """,
             words=["--dataset 'two_files' is a folder holding 2 event files (a.csv, b.tsv)"])
snippet_case("dataset_sports_alias", "data", "load_events_from_args('sports', data_dir)",
             'from pinfm_hf.data import load_events_from_args\nevents = load_events_from_args("sports", DATA_DIR)\n',
             checks=[("amazon-sports: 296,337 events of 35,598 users, action 'review'",
                      lambda s: s.ns["events"].summary()["users"] == 35_598
                      and s.ns["events"].summary()["actions"] == {"review": 296_337})])
snippet_case(
    "time_split_all_tied", "data", "time_split(<every event at one second>, quantile=0.5)",
    """
    import pyarrow as pa
    from pinfm_hf.data import time_split
    tied = pa.table({"user_id": ["u1", "u1", "u2", "u2"], "item_id": ["a", "b", "a", "c"], "action": ["v"] * 4,
                     "timestamp": pa.array([5, 5, 5, 6], pa.int64())})
    before, after, cut = time_split(tied, quantile=0.5)
    """,
    words=["quantile 0.5: no event is before the cut 5"],
)
snippet_case(
    "train_holdout_longer_than_histories", "data", "leave_last_out_split(<histories of 1-2 events>, train_holdout=4)",
    """
    import pyarrow as pa
    from pinfm_hf.data import build_user_sequences, leave_last_out_split, make_event_table
    events = make_event_table(pa.table({"user_id": ["u1", "u1", "u2"], "item_id": ["a", "b", "a"],
                                        "action": ["view"] * 3, "timestamp": [1, 2, 3]}), source="toy")
    splits = leave_last_out_split(build_user_sequences(events), train_holdout=4)
    """,
    words=["No user has 5 or more events", "train_holdout=4"],
)


# =================================================================================================================
# C. Models, tokenizer, pipeline, evaluation (in-process)
# =================================================================================================================

TOKENIZER = """
import pyarrow as pa
from pinfm_hf import PinFMTokenizer
tokenizer = PinFMTokenizer.from_events(pa.table({"item_id": ["a", "b", "c"], "action": ["click", "buy", "view"]}),
                                       num_hash_buckets=8)
"""
snippet_case("encode_events_integer_ids", "tokenizer", "tokenizer.encode_events([2268318, 'b'])",
             TOKENIZER + 'ints = tokenizer.encode_events([2268318, "b"])["input_ids"]\n'
             'strings = tokenizer.encode_events(["2268318", "b"])["input_ids"]\n',
             checks=[("ids of [2268318, 'b'] = ids of ['2268318', 'b']", lambda s: s.ns["ints"] == s.ns["strings"])])
snippet_case("encode_events_bool_id", "tokenizer", "tokenizer.encode_events(['b', True])",
             TOKENIZER + 'tokenizer.encode_events(["b", True])\n', words=["`item_ids[1]` must be a string or an integer"])
snippet_case("encode_events_one_string", "tokenizer", "tokenizer.encode_events('bc')",
             TOKENIZER + 'tokenizer.encode_events("bc")\n', words=["`item_ids` must be a list of item ids"])
snippet_case("encode_events_decreasing_timestamps", "tokenizer", "encode_events(..., timestamps=[1, 9, 4])",
             TOKENIZER + 'tokenizer.encode_events(["b", "c", "b"], timestamps=[1, 9, 4])\n',
             words=["`timestamps[2]` (4) is before `timestamps[1]` (9)"])
snippet_case("encode_events_empty_history_pt", "tokenizer", "encode_events([], ..., return_tensors='pt')",
             TOKENIZER + 'tokenizer.encode_events([], actions=[], timestamps=[], return_tensors="pt")\n',
             words=["`item_ids` is empty"])
snippet_case("encode_events_unknown_action", "tokenizer", "encode_events(['b'], actions=['like'])",
             TOKENIZER + 'tokenizer.encode_events(["b"], actions=["like"])\n', words=["Unknown action 'like'"])
snippet_case("encode_events_length_mismatch", "tokenizer", "encode_events(['b'], timestamps=[1, 2])",
             TOKENIZER + 'tokenizer.encode_events(["b"], timestamps=[1, 2])\n',
             words=["`timestamps` has 2 entries but `item_ids` has 1"])
snippet_case(
    "tokenizer_pad_mixed_lengths", "tokenizer", "tokenizer.pad([3 events, 1 event], return_tensors='pt')",
    code(TOKENIZER, """
    import torch
    from pinfm_hf.data import PinFMDataCollator
    examples = [tokenizer.encode_events(["b", "c", "a"], actions=["buy", "click", "view"], timestamps=[1, 2, 3]),
                tokenizer.encode_events(["c"], actions=["view"], timestamps=[7])]
    padded = tokenizer.pad(examples, return_tensors="pt")
    collator = PinFMDataCollator(pad_token_id=tokenizer.pad_token_id, padding_side=tokenizer.padding_side)
    expected = collator([dict(e) for e in examples])
    """),
    checks=[("every per-event key padded as the collator pads it (same padding side)",
             lambda s: set(s.ns["padded"]) == set(s.ns["expected"])
             and all(torch.equal(s.ns["padded"][k], s.ns["expected"][k]) for k in s.ns["expected"]))],
)
snippet_case("tokenizer_pad_misshapen", "tokenizer", "tokenizer.pad([{3 ids, 1 timestamp}, ...])",
             TOKENIZER + 'e = tokenizer.encode_events(["b", "c", "a"], timestamps=[1, 2, 3])\n'
             'tokenizer.pad([{**e, "timestamps": [1]}, tokenizer.encode_events(["c"], timestamps=[7])])\n',
             words=["`timestamps` has 1 values but `input_ids` has 3"])
snippet_case("hold_out_last_of_one_event", "tokenizer", "encode_sequences(<a 1-event row>, hold_out_last=True)",
             TOKENIZER + 'tokenizer.encode_sequences(pa.table({"item_ids": [["a"]], "actions": [["view"]], '
             '"timestamps": [[1]]}), hold_out_last=True)\n', words=["Row 0 has fewer than 2 events"])
snippet_case("tokenizer_folder_without_vocab", "tokenizer",
             "AutoTokenizer.from_pretrained(<folder minus pinfm_vocab.json>)",
             """
             import os, shutil
             from transformers import AutoTokenizer
             import pinfm_hf
             shutil.copytree("reference/model", "no_vocab")
             os.remove("no_vocab/pinfm_vocab.json")
             tokenizer = AutoTokenizer.from_pretrained("no_vocab")
             """,
             words=["no_vocab", "has no `pinfm_vocab.json`"], needs=("reference",))
snippet_case("tokenizer_corrupt_vocab_json", "tokenizer", "AutoTokenizer.from_pretrained(<truncated pinfm_vocab.json>)",
             """
             import shutil
             from transformers import AutoTokenizer
             import pinfm_hf
             shutil.copytree("reference/model", "bad_vocab")
             open("bad_vocab/pinfm_vocab.json", "w").write('{"items": ["a"')
             tokenizer = AutoTokenizer.from_pretrained("bad_vocab")
             """,
             words=["bad_vocab/pinfm_vocab.json is not valid JSON"], needs=("reference",))

MODEL = """
import torch
from pinfm_hf import PinFMConfig, PinFMForPretraining
config = PinFMConfig(item_vocab_size=50, action_vocab_size=6, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, hidden_dropout_prob=0.0)
torch.manual_seed(0)
model = PinFMForPretraining(config).eval()
inputs = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]), "action_ids": torch.tensor([[2, 3, 2], [3, 2, 0]]),
          "timestamps": torch.tensor([[100, 200, 300], [100, 150, 0]]),
          "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
"""
snippet_case("zero_length_batch", "model_api", "model(<batch of 0 rows>)",
             MODEL + "model(**{k: v[:0] for k, v in inputs.items()})\n", words=["`input_ids` has shape (0, 3)"])
snippet_case("zero_length_histories", "model_api", "model(<2 rows of 0 events>)",
             MODEL + "model(**{k: v[:, :0] for k, v in inputs.items()})\n",
             words=["`input_ids` has shape (2, 0)", "empty history"])
snippet_case(
    "all_padding_row", "model_api", "model(<batch with an all-padding row>)",
    code(MODEL, """
    batch = {k: torch.cat([v[:1], torch.zeros_like(v[:1]), v[1:]]) for k, v in inputs.items()}
    with torch.no_grad():
        alone, together = model(**inputs), model(**batch)
    """),
    checks=[("the empty row's user_embedding is all zeros", lambda s: not s.ns["together"].user_embedding[1].any()),
            ("no NaN anywhere", lambda s: all(torch.isfinite(getattr(s.ns["together"], k)).all()
                                              for k in ("user_embedding", "query_embeddings", "last_hidden_state"))),
            ("the other rows unchanged (1e-5)", lambda s: torch.allclose(
                s.ns["together"].query_embeddings[[0, 2]], s.ns["alone"].query_embeddings, atol=1e-5, rtol=1e-5))],
)
# Bad model inputs: (name, short command, the call on MODEL's `model` and `inputs`, words the error must hold).
for name, short, call, words in [
    ("item_id_out_of_range", "model(input_ids holding 50 = item_vocab_size)",
     'model(**dict(inputs, input_ids=inputs["input_ids"].index_fill(1, torch.tensor([0]), 50)))',
     ["Item ids hold id 50", "`config.item_vocab_size`"]),
    ("negative_item_id", "model(input_ids holding -1)",
     'model(**dict(inputs, input_ids=inputs["input_ids"].index_fill(1, torch.tensor([0]), -1)))', ["Item ids hold id -1"]),
    ("action_id_out_of_range", "model(action_ids holding 6 = action_vocab_size)",
     'model(**dict(inputs, action_ids=inputs["action_ids"].index_fill(1, torch.tensor([0]), 6)))',
     ["`action_ids` hold id 6", "`config.action_vocab_size`"]),
    ("label_out_of_range", "model(..., labels holding 50)",
     'model(**inputs, labels=inputs["input_ids"].index_fill(1, torch.tensor([2]), 50))', ["Item ids hold id 50"]),
    ("decreasing_timestamps_in_model", "model(timestamps [300, 200, 100] in row 0)",
     "model(**dict(inputs, timestamps=torch.tensor([[300, 200, 100], [100, 150, 0]])))",
     ["`timestamps` must not decrease within a sequence", "row 0"]),
    ("attention_mask_misshapen", "model(attention_mask of shape (2, 2))",
     'model(**dict(inputs, attention_mask=inputs["attention_mask"][:, :2]))',
     ["`attention_mask` has shape (2, 2), but `input_ids` has (2, 3)"]),
    ("end_timestamps_wrong_length", "model(..., end_timestamps of 3 for 2 rows)",
     "model(**inputs, end_timestamps=torch.tensor([1, 2, 3]))", ["`end_timestamps` has 3 values for a batch of 2 rows"]),
]:
    snippet_case(name, "model_api", short, MODEL + call + "\n", words=words)
snippet_case("config_heads_do_not_divide", "model_api", "PinFMConfig(hidden_size=30, num_attention_heads=4)",
             "from pinfm_hf import PinFMConfig\nPinFMConfig(hidden_size=30, num_attention_heads=4)\n",
             words=["`hidden_size` (30)", "divisible by `num_attention_heads` (4)"])
CTR_MODEL = MODEL.replace("PinFMForPretraining", "PinFMForCTR").replace(
    "hidden_dropout_prob=0.0", "hidden_dropout_prob=0.0, ctr_fusion=FUSION"
)
snippet_case("score_candidates_user_index_minus_1", "model_api", "score_candidates(candidate_user_index=[0, -1])",
             CTR_MODEL.replace("FUSION", '"late"') + "model.score_candidates(candidate_ids=torch.tensor([5, 6]), "
             "candidate_user_index=torch.tensor([0, -1]), **inputs)\n",
             words=["`candidate_user_index` holds -1, not a user row in [0, 2)"])
snippet_case("ctr_row_without_any_token", "model_api", "PinFMForCTR(<batch with an all-padding row>)",
             CTR_MODEL.replace("FUSION", '"early"')
             + "model(**{k: torch.cat([v, torch.zeros_like(v[:1])]) for k, v in inputs.items()})\n",
             words=["Row 2 has no real token"])
snippet_case(
    "quantised_model_refuses_train", "model_api", "quantised model.train(): refused, every module's mode kept",
    code(MODEL, """
    model.quantize_item_embeddings("int8")
    model.pinfm.layers[0].dropout.train()  # a mixed tree of modes
    before = {name: module.training for name, module in model.named_modules()}
    refusal = None
    try:
        model.train()
    except RuntimeError as error:
        refusal = str(error)
    after = {name: module.training for name, module in model.named_modules()}
    """),
    checks=[("train() refused: 'cannot be trained'", lambda s: "cannot be trained" in (s.ns["refusal"] or "")),
            ("every module's training flag unchanged", lambda s: s.ns["after"] == s.ns["before"])],
)
snippet_case("quantise_twice", "model_api", "model.quantize_item_embeddings('int8') twice",
             MODEL + 'model.quantize_item_embeddings("int8")\nmodel.quantize_item_embeddings("int4")\n',
             words=["already quantised (int8)"])
for name, tensor, short in [("from_pretrained_nan_weights", "pinfm.norm.weight", "NaN weight"),
                            ("from_pretrained_nan_buffer", "next_item_head.item_log_probs", "NaN item_log_probs buffer")]:
    snippet_case(
        name, "model_api", f"AutoModel.from_pretrained(<folder with a {short}>)",
        f"""
        import shutil
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForPreTraining
        import pinfm_hf
        shutil.copytree("reference/model", "{name}")
        weights = load_file("{name}/model.safetensors")
        weights["{tensor}"].view(-1)[0] = float("nan")
        save_file(weights, "{name}/model.safetensors", metadata={{"format": "pt"}})
        model = AutoModelForPreTraining.from_pretrained("{name}")
        """,
        words=[f"{name}/model.safetensors holds 1 non-finite"], needs=("reference",),
    )

PIPELINE = """
import pinfm_hf  # registers the pinfm-recommendation task
from transformers import pipeline
recommend = pipeline("pinfm-recommendation", model="reference/model", device="cpu")
items = recommend.tokenizer.item_tokens[4:24]
history = [{"item_id": item, "action": "rating_4", "timestamp": 978300000 + 60 * i} for i, item in enumerate(items)]
"""
snippet_case("pipeline_exclude_history_no", "pipeline", "recommend(history, exclude_history='no')",
             PIPELINE + 'recommend(history, exclude_history="no")\n',
             words=["`exclude_history` must be a bool, got 'no'"], needs=("reference",))
snippet_case(
    "pipeline_top_k_past_catalogue", "pipeline", "recommend(history, top_k=10**6)",
    PIPELINE + "result = recommend(history, top_k=10**6)\n"
    "catalogue = recommend.tokenizer.item_tokens[4 : recommend.tokenizer.first_bucket_id]\n",
    checks=[("every item not in the history, once (no bucket, no special token)",
             lambda s: sorted(r["item_id"] for r in s.ns["result"]) == sorted(set(s.ns["catalogue"]) - set(s.ns["items"]))),
            ("scores finite and descending", lambda s: all(
                a["score"] >= b_["score"] for a, b_ in zip(s.ns["result"], s.ns["result"][1:]))
             and all(r["score"] == r["score"] and abs(r["score"]) < float("inf") for r in s.ns["result"]))],
    needs=("reference",),
)
snippet_case(
    "pipeline_tokenizer_longer_than_model", "pipeline", "pipeline(model, tokenizer with model_max_length 200 > 51)",
    """
    import pinfm_hf
    from transformers import AutoModelForPreTraining, AutoTokenizer, pipeline
    model = AutoModelForPreTraining.from_pretrained("reference/model")
    tokenizer = AutoTokenizer.from_pretrained("reference/model")
    tokenizer.model_max_length = 200  # the model takes max_position_embeddings = 51
    recommend = pipeline("pinfm-recommendation", model=model, tokenizer=tokenizer, device="cpu")
    history = [{"item_id": item, "action": "rating_4", "timestamp": 978300000 + 60 * i}
               for i, item in enumerate(tokenizer.item_tokens[4:84])]
    everything = recommend(history, top_k=10, exclude_history=False)
    recent = recommend(history[-51:], top_k=10, exclude_history=False)
    """,
    checks=[("warned: histories are cut to their 51 most recent events",
             lambda s: "histories are cut to their 51 most recent events" in s.log),
            ("80 events recommend as their last 51", lambda s: s.ns["everything"] == s.ns["recent"])],
    needs=("reference",),
)
snippet_case("pipeline_request_time_before_history", "pipeline", "recommend(history, request_time=<before its last event>)",
             PIPELINE + 'recommend(history, request_time=history[-1]["timestamp"] - 1)\n',
             words=["`request_time` (978301139) is before the history's last event (978301140)"], needs=("reference",))
snippet_case("pipeline_unknown_action", "pipeline", "recommend([..., {'action': 'rating_9'}, ...])",
             PIPELINE + 'recommend([history[0], {**history[1], "action": "rating_9"}])\n',
             words=["Event 1: unknown `action` 'rating_9'"], needs=("reference",))
snippet_case("pipeline_float_timestamp", "pipeline", "recommend([{'timestamp': 1.5}, ...])",
             PIPELINE + 'recommend([{**history[0], "timestamp": 1.5}, history[1]])\n',
             words=["Event 0: `timestamp` must be an integer"], needs=("reference",))
snippet_case("pipeline_missing_field", "pipeline", "recommend([<event without item_id>])",
             PIPELINE + 'recommend([history[0], {"action": "rating_4", "timestamp": 978400000}])\n',
             words=["Event 1: `item_id` is missing or empty"], needs=("reference",))
snippet_case("pipeline_empty_history", "pipeline", "recommend([])", PIPELINE + "recommend([])\n",
             words=["non-empty list"], needs=("reference",))
snippet_case("pipeline_misspelt_keyword", "pipeline", "recommend(history, topk=3)",
             PIPELINE + "recommend(history, topk=3)\n", words=["Unknown parameter(s) ['topk']"], needs=("reference",))
snippet_case("pipeline_unsorted_history", "pipeline", "recommend(<history in reverse order>)",
             PIPELINE + "in_order = recommend(history, top_k=10)\nreversed_ = recommend(history[::-1], top_k=10)\n",
             checks=[("same top-10 as the time-ordered history", lambda s: s.ns["in_order"] == s.ns["reversed_"])],
             needs=("reference",))
snippet_case(
    "pipeline_fresh_item_in_history", "pipeline", "recommend(<history with an item the tokenizer never saw>)",
    PIPELINE + 'result = recommend(history + [{"item_id": "never-seen", "action": "rating_5", "timestamp": 978400000}])\n',
    checks=[("10 real items, no hash bucket", lambda s: len(s.ns["result"]) == 10 and all(
        r["item_id"] in s.ns["recommend"].tokenizer.item_tokens[4:s.ns["recommend"].tokenizer.first_bucket_id]
        for r in s.ns["result"]))],
    needs=("reference",),
)
snippet_case(
    "pipeline_vocab_size_mismatch", "pipeline", "pipeline(model, tokenizer=<tokenizer with one item fewer>)",
    """
    import pinfm_hf
    from transformers import AutoTokenizer, pipeline
    from pinfm_hf import PinFMTokenizer
    tokenizer = AutoTokenizer.from_pretrained("reference/model")
    other = PinFMTokenizer(items=tokenizer.item_tokens[4 : tokenizer.first_bucket_id - 1],
                           actions=tokenizer.action_tokens[2:], num_hash_buckets=16)
    recommend = pipeline("pinfm-recommendation", model="reference/model", tokenizer=other, device="cpu")
    """,
    words=lambda ns: [f"{len(ns['other'])} item tokens but the model's item table has {len(ns['tokenizer'])}"],
    needs=("reference",),
)
snippet_case("pipeline_folder_without_vocab", "pipeline", "pipeline(model=<folder minus pinfm_vocab.json>)",
             """
             import os, shutil
             import pinfm_hf
             from transformers import pipeline
             shutil.copytree("reference/model", "pipe_no_vocab")
             os.remove("pipe_no_vocab/pinfm_vocab.json")
             recommend = pipeline("pinfm-recommendation", model="pipe_no_vocab", device="cpu")
             """,
             words=["pipe_no_vocab", "has no `pinfm_vocab.json`"], needs=("reference",))
snippet_case("pipeline_model_with_inf_weight", "pipeline", "pipeline(model=<model object with an inf weight>)",
             """
             import torch
             import pinfm_hf
             from transformers import AutoModelForPreTraining, AutoTokenizer, pipeline
             model = AutoModelForPreTraining.from_pretrained("reference/model")
             with torch.no_grad():
                 model.next_item_head.query_proj.weight[0, 0] = float("inf")
             recommend = pipeline("pinfm-recommendation", model=model,
                                  tokenizer=AutoTokenizer.from_pretrained("reference/model"), device="cpu")
             recommend([{"item_id": "Heat (1995)", "action": "rating_4", "timestamp": 978300760}])
             """,
             words=["non-finite scores"], needs=("reference",))

snippet_case(
    "rank_of_targets_nan_target", "evaluation", "rank_of_targets(<NaN scores, NaN targets>)",
    """
    import torch
    from pinfm_hf.metrics import rank_of_targets
    nan = float("nan")
    scores = torch.tensor([[0.1, nan, 0.3, 0.2], [nan, nan, nan, nan], [0.5, 0.1, nan, 0.0], [0.5, 0.1, 0.2, 0.0]])
    ranks = rank_of_targets(scores, torch.tensor([1, 2, 0, 0])).tolist()
    """,
    checks=[("a NaN target ranks last, a NaN rival above the target: [4, 4, 2, 1]",
             lambda s: s.ns["ranks"] == [4, 4, 2, 1])],
)
snippet_case("rank_of_targets_target_out_of_range", "evaluation", "rank_of_targets(scores (2, 5), targets [0, 5])",
             "import torch\nfrom pinfm_hf.metrics import rank_of_targets\n"
             "rank_of_targets(torch.zeros(2, 5), torch.tensor([0, 5]))\n",
             words=["`target_ids` must lie in [0, 5)"])
snippet_case("retrieval_metrics_rank_0", "evaluation", "retrieval_metrics(ranks [0, 1])",
             "import torch\nfrom pinfm_hf.metrics import retrieval_metrics\nretrieval_metrics(torch.tensor([0, 1]))\n",
             words=["`ranks` are 1-based"])
snippet_case(
    "evaluate_next_item_nan_weight", "evaluation", "evaluate_next_item(<model with a NaN weight>, ...)",
    """
    import pyarrow as pa, torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from pinfm_hf import PinFMConfig, PinFMForPretraining, PinFMTokenizer
    from pinfm_hf.data import PinFMDataCollator
    from pinfm_hf.evaluation import evaluate_next_item
    tokenizer = PinFMTokenizer.from_events(pa.table({"item_id": ["a", "b", "c"], "action": ["click"] * 3}),
                                           num_hash_buckets=4)
    sequences = pa.table({"item_ids": [["a", "b", "c", "a"], ["c", "b", "a"]], "actions": [["click"] * 4, ["click"] * 3],
                          "timestamps": [[1, 2, 3, 4], [5, 6, 7]]})
    rows = tokenizer.encode_sequences(sequences, max_length=8, hold_out_last=True).to_pylist()
    loader = DataLoader(rows, batch_size=2, collate_fn=PinFMDataCollator())
    torch.manual_seed(0)
    model = PinFMForPretraining(PinFMConfig(item_vocab_size=len(tokenizer), action_vocab_size=tokenizer.action_vocab_size,
                                            hidden_size=16, num_hidden_layers=1, num_attention_heads=2)).eval()
    with torch.no_grad():
        model.next_item_head.query_proj.weight[0, 0] = float("nan")
    metrics = evaluate_next_item(model, loader, Accelerator(cpu=True),
                                 num_special_tokens=model.config.num_special_item_tokens,
                                 num_scored_ids=tokenizer.first_bucket_id, show_progress=False)
    """,
    words=["2 of 2 evaluation users have non-finite", "no metric is reported"],
)
CTR_METRIC = "from pinfm_hf.evaluate_metrics import load_ctr_metric\nmetric = load_ctr_metric()\n"
snippet_case("ctr_metrics_one_class", "evaluation", "ctr_metrics.compute(<every label 1>)",
             CTR_METRIC + "metric.compute(predictions=[0.2, 0.9, 0.6], references=[1, 1, 1], user_ids=[1, 1, 2])\n",
             words=["All 3 references are the same class (1): ROC AUC is undefined"])
snippet_case("ctr_metrics_nan_prediction", "evaluation", "ctr_metrics.compute(<a NaN prediction>)",
             CTR_METRIC + "metric.compute(predictions=[0.2, float('nan'), 0.6], references=[0, 1, 1], "
             "user_ids=[1, 1, 2])\n",
             words=["predictions must be probabilities in [0, 1] and not NaN", "at index 1"])
snippet_case("ctr_metrics_label_2", "evaluation", "ctr_metrics.compute(<a label 2>)",
             CTR_METRIC + "metric.compute(predictions=[0.2, 0.9, 0.6], references=[0, 2, 1], user_ids=[1, 1, 2])\n",
             words=["references must be 0 or 1; got 2 at index 1"])
snippet_case(
    "save_checkpoint_nan_weights", "divergence", "RunFolder.save_checkpoint(<model with a NaN weight>)",
    """
    import torch
    from accelerate import Accelerator
    from pinfm_hf.checkpointing import LoopPosition, RunFolder, list_checkpoints
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(4, 3))
    run = RunFolder("nan_save")
    run.claim()
    run.save_checkpoint(accelerator, model, LoopPosition(step=1), 5)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    run.save_checkpoint(accelerator, model, LoopPosition(step=2), 5)
    """,
    words=["1 parameter tensor(s) or buffer(s) hold NaN or infinity at step 2", "first: weight"],
    after=[("checkpoint-1 kept, no checkpoint-2",
            lambda s: [c.name for c in list_checkpoints("nan_save/checkpoints")] == ["checkpoint-1"])],
)


# ----- running ----------------------------------------------------------------------------------------------------


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "code_modified": bool(git("status", "--porcelain", "--", "src", "recipes"))}


def markdown_table(cases: list[dict[str, Any]]) -> str:
    lines = ["| # | case | category | outcome | s | what it said / what was checked |", "|---|---|---|---|---|---|"]
    for i, c in enumerate(cases, 1):
        detail = c["detail"].replace("|", "\\|")
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        lines.append(f"| {i} | {c['name']} | {c['category']} | {c['outcome']} | {c['seconds']:.1f} | {detail} |")
    return "\n".join(lines)


def run_case(bench: Bench, c: Case) -> dict[str, Any]:
    bench.commands = []
    fixtures_before = bench.fixture_seconds
    start = time.time()
    try:
        outcome, detail, expect = c.run(bench)
    except Exception as e:  # the case itself broke: no outcome was observed, so it cannot count as handled
        outcome, expect = "silent", ""
        detail = f"the case could not run: {type(e).__name__}: {first_line(str(e))}"
        traceback.print_exc(file=sys.stderr)
    seconds = time.time() - start - (bench.fixture_seconds - fixtures_before)
    assert outcome in OUTCOMES, outcome
    # The fixtures a case used first, then its own steps.
    commands = sorted(dict.fromkeys(bench.commands), key=lambda command: not command.startswith("# fixture"))
    return {"name": c.name, "category": c.category, "command": "\n".join(commands), "short": c.short,
            "expect": bench.show(expect), "outcome": outcome, "detail": bench.show(detail), "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Run every reliability case (bad inputs, flags, damaged checkpoints, kill -9 at each save point, "
        "hub tokens, model/pipeline misuse) for real and classify each as error / recovered / silent.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output", type=Path, default=None, help="Write the JSON report here (it is also printed).")
    parser.add_argument("--only", nargs="+", metavar="NAME", default=None, help="Run only these cases (see --list).")
    parser.add_argument("--list", action="store_true", help="List the cases (name, category, short command) and exit.")
    parser.add_argument("--data_dir", type=Path, default=Path("../shared/data"),
                        help="Shared data (ml-1m/, taobao-sample/, amazon-sports/), relative to the repository root.")
    parser.add_argument("--jobs", type=int, default=2,
                        help="Recipe cases run at a time (each is a subprocess); in-process cases run one at a time "
                        "beside them.")
    parser.add_argument("--work_dir", type=Path, default=None,
                        help="Empty or new folder for every generated file and run (default: a fresh temporary folder, "
                        "deleted at the end).")
    args = parser.parse_args()

    if args.list:
        for c in CASES:
            print(f"{c.name:45s} {c.category:11s} {c.short}")
        return
    selected = CASES
    if args.only:
        known = {c.name for c in CASES}
        unknown = [n for n in args.only if n not in known]
        if unknown:
            parser.error(f"unknown case(s) {unknown}; see --list")
        selected = [c for c in CASES if c.name in args.only]
    data_dir = args.data_dir if args.data_dir.is_absolute() else (ROOT / args.data_dir)
    if not data_dir.is_dir():
        parser.error(f"--data_dir {data_dir} is not a folder (see the README: ../shared/data)")
    temporary = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="pinfm-reliability-")) if temporary else args.work_dir.resolve()
    if not temporary:
        if work.exists() and any(work.iterdir()):
            parser.error(f"--work_dir {work} is not empty: give an empty or new folder")
        work.mkdir(parents=True, exist_ok=True)

    bench = Bench(work=work, data_dir=data_dir.resolve())
    start = time.time()
    results: dict[str, dict[str, Any]] = {}
    progress = threading.Lock()

    def run_and_report(c: Case) -> None:
        result = run_case(bench, c)
        with progress:
            results[c.name] = result
            print(f"[{len(results)}/{len(selected)}] {c.name}: {result['outcome']} ({result['seconds']:.1f} s) "
                  f"{first_line(result['detail'], 150)}", file=sys.stderr, flush=True)

    try:
        # Recipe cases wait on subprocesses: `--jobs` of them at a time in threads, while the in-process cases run
        # one by one in this thread (they change the working directory and capture the logs).
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(run_and_report, c) for c in selected if not c.in_process]
            for c in selected:
                if c.in_process:
                    run_and_report(c)
            for future in futures:
                future.result()
    finally:
        bench.close()
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    results = [results[c.name] for c in selected]
    counts = {outcome: sum(r["outcome"] == outcome for r in results) for outcome in OUTCOMES}
    print("\n" + markdown_table(results), file=sys.stderr)
    print(f"\n{len(results)} cases: {counts}", file=sys.stderr)
    report = {
        "benchmark": "reliability",
        "command": " ".join(["python", "benchmarks/bench_reliability.py", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        **git_commit(),
        "counts": counts,
        "seconds": round(time.time() - start, 1),
        "jobs": args.jobs,
        "fixtures": {name: {key: f[key] for key in ("commands", "seconds", "error") if key in f}
                     for name, f in bench.fixtures.items()},
        "work_dir": "$WORK = " + ("a fresh temporary folder (deleted)" if temporary else str(work)),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "pinfm_hf": pinfm_hf.__version__,
                    "cpus": os.cpu_count(), "platform": platform.platform()},
        "cases": results,
    }
    emit(report, args.output)


if __name__ == "__main__":
    main()
