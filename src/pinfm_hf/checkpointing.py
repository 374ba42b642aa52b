"""Run folders and resumable checkpoints, shared by the recipes.

A run folder (`--output_dir`) belongs to one run at a time:
- a lock (`run.lock`, released by the OS when the process dies, even on `kill -9`) refuses a second run writing to it
  at the same time, naming the holder from `run.json`;
- a new run refuses a folder that holds another run's outputs unless `--overwrite_output_dir` (or resuming) says
  otherwise, and checkpoint rotation only ever deletes checkpoints of the current run (each records its `run_id`).

A checkpoint is written into a temporary folder (`accelerator.save_state`), every file synced, and its manifest
(`training_state.json`: the loop position, the run id, each file's size and SHA-256) written last, before one rename
to `checkpoint-<step>`. Resuming verifies the manifest, loads, checks the weights are finite, and falls back to the
previous checkpoint, with a warning naming what was wrong, when the newest is damaged.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import os
import re
import shutil
import signal
import socket
import sys
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import torch
from transformers.utils import logging

from .io_utils import PathLike, atomic_write_json, read_json, settle_folder


logger = logging.get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.json"
LOCK_FILE = "run.lock"
RUN_FILE = "run.json"
# What a run leaves in its folder: a new run must not mix its outputs with these of another run.
RUN_OUTPUTS = ("checkpoints", "model", "adapter", "best_model", "results.json", "train_log.jsonl", "training_curves.png")
# `PINFM_FAULT_AT=<point>@<step>[,...]` kills the process with SIGKILL at that point (fault-injection tests).
FAULT_ENV = "PINFM_FAULT_AT"


class RunFolderError(RuntimeError):
    """The run folder cannot be used: another run holds it, or it holds another run's outputs."""


class TrainingDivergedError(RuntimeError):
    """The loss, the gradient norm or the weights became non-finite."""


def fault_point(name: str, step: int) -> None:
    """Kill this process with SIGKILL when `PINFM_FAULT_AT` names `<name>@<step>`: a real crash, for recovery tests."""
    wanted = os.environ.get(FAULT_ENV)
    if wanted and f"{name}@{step}" in wanted.split(","):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class LoopPosition:
    """
    Where a training loop stands: optimizer steps done, epoch, batches of that epoch consumed, micro-steps done; and
    the best validation so far (`--load_best_model_at_end`): its metric, its step, validations since.
    """

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    micro_step: int = 0
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    validations_since_best: int = 0


def list_checkpoints(checkpoint_dir: PathLike) -> list[Path]:
    """Checkpoint folders (`checkpoint-<step>`), oldest first; temporary folders of an unfinished save are ignored."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def _read_json_object(path: Path) -> Optional[dict[str, Any]]:
    try:
        value = read_json(path)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_training_state(checkpoint: PathLike) -> Optional[dict[str, Any]]:
    """The manifest of a checkpoint, or None when it is missing or unreadable (an unfinished or damaged save)."""
    return _read_json_object(Path(checkpoint) / STATE_FILE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        str(path.relative_to(folder)): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != STATE_FILE
    }


def verify_checkpoint(checkpoint: PathLike) -> Optional[str]:
    """What is wrong with a checkpoint (missing manifest, a missing, truncated or altered file), or None if it is whole."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return "does not exist"
    state = read_training_state(checkpoint)
    if state is None:
        return f"has no readable {STATE_FILE} (an unfinished or damaged save)"
    files = state.get("files")
    if not isinstance(files, dict) or not files:
        return f"{STATE_FILE} lists no files (not written by this version of pinfm-hf)"
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"misses {name}"
        size = path.stat().st_size
        if size != expected.get("size"):
            return f"{name} has {size} bytes, the manifest says {expected.get('size')} (truncated or replaced)"
        if _sha256(path) != expected.get("sha256"):
            return f"{name} does not match its SHA-256 in {STATE_FILE} (corrupted)"
    return None


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and float buffers (e.g. the item popularity the losses read) holding NaN or infinity."""
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    return [name for name, tensor in tensors if tensor.is_floating_point() and not bool(torch.isfinite(tensor.detach()).all())]


def check_finite_parameters(model: torch.nn.Module, *, when: str) -> None:
    """Raise `TrainingDivergedError` if any weight or float buffer is NaN or infinite, so nothing is saved from them."""
    bad = non_finite_parameters(model)
    if bad:
        raise TrainingDivergedError(
            f"{len(bad)} parameter tensor(s) or buffer(s) hold NaN or infinity {when} (first: {bad[0]}); nothing was "
            "written from them. "
            "Lower --learning_rate or set --max_grad_norm, then resume from the last good checkpoint."
        )


def check_finite_step(step: int, losses: dict[str, float], grad_norm: Optional[float], last_checkpoint: Optional[Path]) -> None:
    """Stop at the first optimizer step whose loss or gradient norm is not finite, before the optimizer applies it."""
    bad = {name: value for name, value in losses.items() if not _finite(value)}
    if grad_norm is not None and not _finite(grad_norm):
        bad["grad_norm"] = grad_norm
    if not bad:
        return
    found = ", ".join(f"{name} = {value}" for name, value in bad.items())
    keep = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
    raise TrainingDivergedError(
        f"Training diverged at step {step}: {found}. The step was not applied and {keep}. Lower --learning_rate or set "
        "--max_grad_norm, then resume with --resume_from_checkpoint latest (or start again)."
    )


def _finite(value: Optional[float]) -> bool:
    return value is not None and value == value and value not in (float("inf"), float("-inf"))


class RunFolder:
    """
    The output folder of one training run (see the module docstring). Call [`RunFolder.claim`] before reading any
    data, [`RunFolder.resume`] once the model and optimizer are prepared, then [`RunFolder.save_checkpoint`].

    Args:
        output_dir (`str` or `os.PathLike`): the run folder.
        is_main_process (`bool`): only the main process locks, checks and writes the folder.
    """

    def __init__(self, output_dir: PathLike, *, is_main_process: bool = True):
        self.output_dir = Path(output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.is_main_process = is_main_process
        self.run_id: Optional[str] = None
        self.last_checkpoint: Optional[Path] = None
        self._lock = None

    # ----- claiming the folder -----------------------------------------------------------------------------------

    def claim(self, *, resume_from_checkpoint: Optional[str] = None, overwrite_output_dir: bool = False) -> None:
        """
        Lock the folder for this run and check that it holds no other run's outputs. A fresh run (no
        `resume_from_checkpoint`) refuses a folder with outputs; resuming refuses checkpoints of another run beside
        the one resumed. `overwrite_output_dir` deletes those outputs instead. Call it before reading data, so a bad
        folder fails in a second, not after the data is loaded.
        """
        if not self.is_main_process:
            return
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise RunFolderError(f"--output_dir {self.output_dir} is a file, not a folder: choose another path.")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        resumed = self._resumed_state(resume_from_checkpoint)
        self.run_id = (resumed or {}).get("run_id") or uuid.uuid4().hex
        foreign = self._foreign_outputs(fresh=resume_from_checkpoint is None)
        if foreign and not overwrite_output_dir:
            self.release()
            how = (
                "pass --resume_from_checkpoint latest to continue that run, --overwrite_output_dir true to replace it"
                if resume_from_checkpoint is None
                else "pass --overwrite_output_dir true to delete them"
            )
            raise RunFolderError(
                f"{self.output_dir} holds the outputs of another run ({', '.join(foreign)}): {how}, or choose another "
                "--output_dir."
            )
        for name in foreign:
            path = self.output_dir / name
            logger.warning(f"--overwrite_output_dir: deleting {path}, left by another run.")
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        for tmp in self.checkpoint_dir.glob(f".tmp-{CHECKPOINT_PREFIX}*") if self.checkpoint_dir.is_dir() else []:
            shutil.rmtree(tmp, ignore_errors=True)  # an unfinished save of a killed run
        atomic_write_json(
            self.output_dir / RUN_FILE,
            {
                "run_id": self.run_id,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "argv": sys.argv,
            },
        )

    def _acquire_lock(self) -> None:
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.output_dir / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            holder = _read_json_object(self.output_dir / RUN_FILE)
            who = (
                f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}" if holder else "unknown"
            )
            raise RunFolderError(
                f"{self.output_dir} is in use by another run ({who}; lock {self.output_dir / LOCK_FILE}). Wait for it "
                "to finish or choose another --output_dir."
            ) from None
        self._lock = lock

    def release(self) -> None:
        """Release the folder's lock (the OS also releases it when the process ends)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _resumed_state(self, resume_from_checkpoint: Optional[str]) -> Optional[dict[str, Any]]:
        if resume_from_checkpoint is None:
            return None
        if resume_from_checkpoint == "latest":
            for checkpoint in reversed(list_checkpoints(self.checkpoint_dir)):
                state = read_training_state(checkpoint)
                if state is not None:
                    return state
            return None
        path = Path(resume_from_checkpoint)
        state = read_training_state(path)  # verified in full when it is loaded
        if state is None:
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no readable {STATE_FILE}).")
        return state

    def _foreign_outputs(self, *, fresh: bool) -> list[str]:
        """Outputs in the folder that this run did not write: all of them for a fresh run, else other runs' checkpoints."""
        if fresh:
            found = [name for name in RUN_OUTPUTS if (self.output_dir / name).exists()]
            if found == ["checkpoints"] and not any(self.checkpoint_dir.iterdir()):
                return []
            return found
        foreign = []
        for checkpoint in list_checkpoints(self.checkpoint_dir):
            state = read_training_state(checkpoint)
            if state is not None and state.get("run_id") != self.run_id:
                foreign.append(f"checkpoints/{checkpoint.name}")
        return foreign

    # ----- checkpoints -------------------------------------------------------------------------------------------

    def save_checkpoint(self, accelerator, model: torch.nn.Module, position: LoopPosition, keep_last: int) -> Path:
        """
        Save model, optimizer, scheduler, sampler and RNG states at `position` (all processes call it), then keep the
        newest `keep_last` checkpoints of this run. Refuses non-finite weights, so the last good checkpoint survives.
        """
        check_finite_parameters(model, when=f"at step {position.step}")
        step = position.step
        final = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{step}"
        tmp = self.checkpoint_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
        if self.is_main_process:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        fault_point("checkpoint-start", step)
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if self.is_main_process:
            fault_point("checkpoint-files", step)
            settle_folder(tmp)
            state = {"run_id": self.run_id, **asdict(position), "files": _file_manifest(tmp)}
            atomic_write_json(tmp / STATE_FILE, state)  # written last: the checkpoint is complete from here on
            fault_point("checkpoint-rename", step)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fault_point("checkpoint-rotate", step)
            own = [c for c in list_checkpoints(self.checkpoint_dir) if (read_training_state(c) or {}).get("run_id") == self.run_id]
            for old in own[:-keep_last] if keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        self.last_checkpoint = final
        return final

    def resume(self, accelerator, model: torch.nn.Module, resume_from_checkpoint: Optional[str]) -> Optional[LoopPosition]:
        """
        Restore the newest loadable checkpoint (`"latest"`, falling back past damaged ones with a warning) or the one
        named, and return its loop position; None for a fresh start (no checkpoint asked for, or none written yet).
        """
        if resume_from_checkpoint is None:
            return None
        explicit = resume_from_checkpoint != "latest"
        candidates = [Path(resume_from_checkpoint)] if explicit else list(reversed(list_checkpoints(self.checkpoint_dir)))
        problems = []
        for checkpoint in candidates:
            problem = self._load(accelerator, model, checkpoint)
            if problem is None:
                state = read_training_state(checkpoint)
                self.run_id = self.run_id or state.get("run_id")
                self.last_checkpoint = checkpoint
                # Checkpoints written before best-model tracking have no `best_*` keys: their defaults apply.
                position = LoopPosition(**{f.name: state[f.name] for f in fields(LoopPosition) if f.name in state})
                if problems:
                    logger.warning(f"Resumed from {checkpoint} after skipping: {'; '.join(problems)}.")
                logger.warning(f"Resumed from {checkpoint} at step {position.step} (epoch {position.epoch}, batch {position.batches_in_epoch}).")
                return position
            if explicit:
                raise ValueError(f"Cannot resume from {checkpoint}: it {problem}.")
            logger.warning(f"Skipping {checkpoint}: it {problem}; falling back to the checkpoint before it.")
            problems.append(f"{checkpoint.name} {problem}")
        if problems:
            raise RunFolderError(
                f"No loadable checkpoint in {self.checkpoint_dir}: {'; '.join(problems)}. Pass --overwrite_output_dir true "
                "without --resume_from_checkpoint to start again."
            )
        return None

    @staticmethod
    def _load(accelerator, model: torch.nn.Module, checkpoint: Path) -> Optional[str]:
        """Verify and load one checkpoint; what went wrong, or None."""
        problem = verify_checkpoint(checkpoint)
        if problem is not None:
            return problem
        try:
            accelerator.load_state(str(checkpoint))
        except Exception as error:  # any library error here means "this checkpoint cannot be used"
            return f"cannot be loaded ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        bad = non_finite_parameters(model)
        if bad:
            return f"holds non-finite weights ({len(bad)} tensors, first {bad[0]})"
        return None


__all__ = [
    "CHECKPOINT_PREFIX",
    "LoopPosition",
    "RunFolder",
    "RunFolderError",
    "TrainingDivergedError",
    "check_finite_parameters",
    "check_finite_step",
    "fault_point",
    "list_checkpoints",
    "verify_checkpoint",
]
