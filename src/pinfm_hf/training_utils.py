"""Plumbing shared by the recipes: arguments, run logs, atomic checkpoints, plots. No training logic lives here."""

import json
import os
import re
import resource
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import yaml
from transformers import HfArgumentParser
from transformers.utils import logging


logger = logging.get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"


def make_accelerator(
    output_dir: str | os.PathLike, *, mixed_precision: str = "auto", gradient_accumulation_steps: int = 1,
    report_to: Optional[str] = None,
):
    """
    The recipes' `Accelerator` (bf16 on a GPU that has it when `mixed_precision="auto"`, seedable sampler so the data
    order is a function of the seed and epoch) and their log format; only the main process logs at INFO.
    """
    import logging as std_logging

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=report_to,
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    std_logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=std_logging.INFO
    )
    std_logging.getLogger("pinfm_hf").setLevel(std_logging.INFO if accelerator.is_main_process else std_logging.ERROR)
    std_logging.getLogger("accelerate").setLevel(std_logging.WARNING)
    logging.set_verbosity_warning()
    return accelerator


def parse_recipe_args(dataclass_types: Sequence[type], args: Optional[list[str]] = None) -> tuple:
    """
    Parse recipe arguments: `--config file.yaml` supplies defaults, any other `--field value` on the command line
    overrides them. Unknown YAML keys are an error naming the key and the file.
    """
    args = list(sys.argv[1:] if args is None else args)
    parser = HfArgumentParser(dataclass_types)
    parser.add_argument("--config", type=str, default=None, help="YAML file of defaults; CLI flags override it.")
    config_path = None
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args):
            raise ValueError("`--config` needs a YAML file path.")
        config_path = args[i + 1]
    elif any(a.startswith("--config=") for a in args):
        config_path = next(a for a in args if a.startswith("--config="))[len("--config=") :]
    if config_path:
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"Recipe config {config_path!r} does not exist.")
        with open(config_path, encoding="utf-8") as f:
            defaults = yaml.safe_load(f) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(defaults) - known)
        if unknown:
            raise ValueError(f"{config_path}: unknown keys {unknown}; see `--help` for the accepted fields.")
        parser.set_defaults(**defaults)
        # Required dataclass fields satisfied by the YAML are no longer required on the command line.
        for action in parser._actions:
            if action.dest in defaults:
                action.required = False
    *parsed, remaining = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
    if remaining:
        raise ValueError(f"Unknown arguments {remaining}; see `--help`.")
    # The last parsed item is the namespace holding `--config`; the caller wants only its dataclasses.
    return tuple(parsed[: len(dataclass_types)])


class JsonlLogger:
    """Appends one JSON object per line; each write is flushed so a killed run keeps its log."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run re-logs them), keeping the log one consistent history."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (`checkpoint-<step>`), oldest first; half-written temp folders are ignored."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def resolve_checkpoint(resume_from_checkpoint: Optional[str], checkpoint_dir: str | os.PathLike) -> Optional[Path]:
    """`"latest"` -> newest complete checkpoint (None when there is none yet); a path -> that path, checked."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(checkpoint_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not (path / "training_state.json").exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no training_state.json).")
    return path


def save_checkpoint(accelerator, checkpoint_dir: str | os.PathLike, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """
    `accelerator.save_state` into a temp folder, then an atomic rename to `checkpoint-<step>`: a run killed while
    saving never leaves a checkpoint that looks complete. Keeps the newest `keep_last` checkpoints.
    """
    root = Path(checkpoint_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "training_state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


@contextmanager
def atomic_folder(final: str | os.PathLike) -> Iterator[Path]:
    """
    Yield a temp folder to write into; on success it replaces `final` in one rename, so a run killed while saving
    leaves either the previous folder or the new one, never a half-written one.
    """
    final = Path(final)
    tmp, old = final.with_name(f".tmp-{final.name}"), final.with_name(f".old-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_training_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / "training_state.json").read_text())


def finish(accelerator) -> None:
    """Wait for every rank, then end trackers and tear the process group down (a rank left in interpreter shutdown
    while its peer still holds the gloo group can hang)."""
    import torch.distributed as dist

    accelerator.wait_for_everyone()
    accelerator.end_training()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def plot_training_curves(log_path: str | os.PathLike, png_path: str | os.PathLike, keys: Optional[Sequence[str]] = None) -> Optional[Path]:
    """Plot every numeric series of a JSONL run log (with at least two points) against `step`, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_jsonl(log_path) if "step" in r]
    if not records:
        return None
    if keys is None:
        keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")})
    keys = [k for k in keys if sum(k in r for r in records) >= 2]  # a curve needs two points; finals go to results.json
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(".tmp-" + png_path.name)
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


def cosine_schedule(
    optimizer, accelerator, *, num_batches: int, gradient_accumulation_steps: int, num_train_epochs: int,
    max_steps: int, warmup_steps: int,
):
    """
    Plan the run and build its warm-up + cosine schedule, prepared by Accelerate.

    Returns `(scheduler, steps_per_epoch, total_steps, num_epochs)`; `max_steps > 0` overrides the epochs.
    """
    from transformers import get_cosine_schedule_with_warmup

    steps_per_epoch = max(-(-num_batches // gradient_accumulation_steps), 1)
    total_steps = max_steps if max_steps > 0 else steps_per_epoch * num_train_epochs
    num_epochs = -(-total_steps // steps_per_epoch)
    # The prepared scheduler steps once per process per optimizer step (Accelerate), hence the factor.
    scheduler = get_cosine_schedule_with_warmup(
        optimizer,
        num_warmup_steps=min(warmup_steps, total_steps) * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    return accelerator.prepare(scheduler), steps_per_epoch, total_steps, num_epochs


def start_or_resume(accelerator, resume_from_checkpoint: Optional[str], checkpoint_dir: str | os.PathLike, run_log: JsonlLogger) -> dict[str, int]:
    """
    Restore model, optimizer, scheduler and RNG states from a checkpoint (`"latest"` or a folder) and cut the run
    log back to it; a fresh run starts a fresh log. Returns the loop position: `step`, `epoch`, `batches_in_epoch`
    (batches of that epoch already consumed) and `micro_step`.
    """
    checkpoint = resolve_checkpoint(resume_from_checkpoint, checkpoint_dir)
    if checkpoint is None:
        if accelerator.is_main_process and run_log.path.exists():
            run_log.path.unlink()
        return {"step": 0, "epoch": 0, "batches_in_epoch": 0, "micro_step": 0}
    accelerator.load_state(str(checkpoint))
    state = load_training_state(checkpoint)
    run_log.truncate_after(state["step"])
    logger.warning(f"Resumed from {checkpoint} at step {state['step']} (epoch {state['epoch']}, batch {state['batches_in_epoch']}).")
    return {key: state[key] for key in ("step", "epoch", "batches_in_epoch", "micro_step")}


def reduce_step_losses(step_losses: list[dict[str, Any]], accelerator) -> dict[str, float]:
    """Mean of each loss over the micro-batches of one optimizer step, averaged across processes."""
    import torch

    record = {}
    for key in step_losses[0]:
        mean = torch.stack([losses[key] for losses in step_losses]).mean()
        record[key] = accelerator.reduce(mean, reduction="mean").item()
    return record


def parameter_checksums(model, accelerator) -> list[float]:
    """One parameter sum per rank: equal values show the processes trained in sync."""
    import torch

    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    return accelerator.gather(checksum.to(accelerator.device)).tolist()
