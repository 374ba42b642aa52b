"""Plumbing shared by the recipes: arguments, run logs, atomic checkpoints, plots. No training logic lives here."""

import atexit
import gc
import json
import os
import resource
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from transformers import HfArgumentParser
from transformers.utils import logging

from .io_utils import atomic_write, to_json


logger = logging.get_logger(__name__)


def make_accelerator(
    output_dir: str | os.PathLike, *, mixed_precision: str = "auto", gradient_accumulation_steps: int = 1,
    report_to: Optional[str] = None, ddp_timeout: int = 1800,
):
    """
    The recipes' `Accelerator`: bf16 on a GPU that has it when `mixed_precision="auto"`, a seedable sampler, so the
    data order is a function of the seed and the epoch (exact resume), and collectives that fail after `ddp_timeout`
    seconds rather than hang.
    """
    import datetime

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=report_to,
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=ddp_timeout))],
    )


def configure_recipe_logging(is_main_process: bool = True) -> None:
    """
    The recipes' log format (time, level, logger) at INFO on the main process, ERROR on the others. Only scripts call
    this: the library itself never configures logging.
    """
    import logging as std_logging

    std_logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=std_logging.INFO
    )
    std_logging.getLogger("pinfm_hf").setLevel(std_logging.INFO if is_main_process else std_logging.ERROR)
    std_logging.getLogger("accelerate").setLevel(std_logging.WARNING)
    logging.set_verbosity_warning()


def parse_recipe_args(dataclass_types: Sequence[type], args: Optional[list[str]] = None) -> tuple:
    """
    Parse recipe arguments: `--config file.yaml` supplies defaults, any other `--field value` on the command line
    overrides them. Unknown YAML keys are an error naming the key and the file.
    """
    args = list(sys.argv[1:] if args is None else args)
    parser = HfArgumentParser(dataclass_types)
    parser.add_argument("--config", type=str, default=None, help="YAML file of defaults; CLI flags override it.")
    config_path = None
    given = [i for i, a in enumerate(args) if a == "--config" or a.startswith("--config=")]
    if len(given) > 1:
        raise ValueError(f"`--config` is given {len(given)} times; give one YAML file and override its fields with flags.")
    if given:
        i = given[0]
        if args[i] != "--config":
            config_path = args[i][len("--config=") :]
        elif i + 1 >= len(args):
            raise ValueError("`--config` needs a YAML file path.")
        else:
            config_path = args[i + 1]
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


def check_ranges(
    args: Any,
    *,
    positive: Sequence[str] = (),
    non_negative: Sequence[str] = (),
    fractions: Sequence[str] = (),
    quantiles: Sequence[str] = (),
) -> None:
    """
    Refuse out-of-range numeric recipe arguments as they are parsed (call it from the dataclass's `__post_init__`),
    before any data loads, with an error naming the flag and the allowed range: `positive` > 0, `non_negative` >= 0,
    `fractions` in [0, 1), `quantiles` strictly between 0 and 1. `None` (an unset optional) passes; NaN never does;
    a list (e.g. layer sizes) is checked element by element.
    """
    rules = (
        (positive, "> 0", lambda v: v > 0),
        (non_negative, ">= 0", lambda v: v >= 0),
        (fractions, "in [0, 1)", lambda v: 0 <= v < 1),
        (quantiles, "strictly between 0 and 1", lambda v: 0 < v < 1),
    )
    for names, allowed, ok in rules:
        for name in names:
            value = getattr(args, name)
            if value is None:
                continue
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(item, bool) or not isinstance(item, (int, float)) or not ok(item):
                    raise ValueError(f"--{name} must be {allowed}, got {value!r}.")


class JsonlLogger:
    """
    Appends one strict JSON object per line (non-finite floats become `null`); each write is flushed, so a killed run
    keeps its log.
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(to_json(record) + "\n")

    def restart(self, step: int) -> None:
        """
        Keep the records up to `step` (0: none), for a run that starts or resumes there and logs the later steps again.
        A line torn by a kill mid-write is dropped.
        """
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                logger.warning(f"{self.path}: dropping a torn line ({line[:60]!r}).")
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        if step == 0 and not kept:
            self.path.unlink()
            return
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept), encoding="utf-8"))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# The default process group of a finished run, kept until interpreter exit: see `_release_process_groups`.
_FINISHED_PROCESS_GROUPS: list = []


def finish(accelerator) -> None:
    """Wait for every rank, then end trackers and tear the process group down (a rank left in interpreter shutdown
    while its peer still holds the gloo group can hang), keeping the group object itself until exit."""
    import torch.distributed as dist

    accelerator.wait_for_everyone()
    if dist.is_available() and dist.is_initialized():
        if not _FINISHED_PROCESS_GROUPS:
            atexit.register(_release_process_groups)
        _FINISHED_PROCESS_GROUPS.append(dist.group.WORLD)
    accelerator.end_training()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _release_process_groups() -> None:
    """
    Destroy the finished runs' process groups, after their DDP models. A DDP model's reducer that drops the last
    reference destroys the gloo group while holding the GIL, and joins worker threads that may still need the GIL to
    free the tensors of the last collective: a deadlock (pytorch/pytorch#56297), seen as a two-process run that had
    written its outputs and never exited (3 runs in 184 on a loaded 2-core CPU; none in 176 since). Dropped here
    instead, through its Python binding, the group is destroyed with the GIL released.
    """
    gc.collect()  # DDP models caught in reference cycles go now, while the group is still held here
    _FINISHED_PROCESS_GROUPS.clear()


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
    png_path = atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
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
