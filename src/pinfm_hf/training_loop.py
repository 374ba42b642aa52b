"""The run bookkeeping both recipes share, so that each recipe's loop shows only what it trains (torchtune style).

`start_run` makes the `Accelerator` and claims the run folder before any data is read; [`TrainingLoop`] resumes,
counts steps, seeds each micro-step, clips, stops on a non-finite loss, logs, checkpoints and saves the outputs. The
recipes (`recipes/pretrain.py`, `recipes/finetune_ctr.py`) show the loop it serves.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from accelerate.utils import send_to_device, set_seed
from tqdm.auto import tqdm
from transformers.utils import logging

from .checkpointing import LoopPosition, RunFolder, check_finite_step, fault_point
from .io_utils import atomic_folder, atomic_write_json, read_json
from .training_utils import (
    JsonlLogger,
    configure_recipe_logging,
    finish,
    make_accelerator,
    plot_training_curves,
    reduce_step_losses,
)


if TYPE_CHECKING:
    from .arguments import TrainingArguments
    from .hub import HubArguments

logger = logging.get_logger(__name__)

BEST_STATE_FILE = "best_validation.json"


def start_run(train_args: TrainingArguments, hub_args: HubArguments):
    """
    A recipe's first step: the `Accelerator`, its logging, the run folder claimed (locked, no other run's outputs) and
    the hub push checked, so that a bad folder or token fails in a second, before any data is read; then the seed.
    Returns `(accelerator, run)`.
    """
    accelerator = make_accelerator(
        train_args.output_dir,
        mixed_precision=train_args.mixed_precision,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        report_to=train_args.report_to,
        ddp_timeout=train_args.ddp_timeout,
    )
    configure_recipe_logging(accelerator.is_main_process)
    run = RunFolder(train_args.output_dir, is_main_process=accelerator.is_main_process)
    run.claim(resume_from_checkpoint=train_args.resume_from_checkpoint, overwrite_output_dir=train_args.overwrite_output_dir)
    hub_args.check_access()
    set_seed(train_args.seed)
    return accelerator, run


class TrainingLoop:
    """
    Resume (`train_args.resume_from_checkpoint`), loop position, reproducible randomness, gradient clipping and the
    finite-loss guard, the JSONL log, periodic and final checkpoints, the `--stop_after_steps` interruption and the
    saved outputs of an Accelerate training loop.

    Args:
        accelerator, model, scheduler: prepared by `accelerator` (gradient accumulation is its own).
        run (`RunFolder`): the claimed run folder (`start_run`).
        train_args (`TrainingArguments`): seed, clipping, checkpointing and logging flags.
        total_steps, num_epochs (`int`): the plan (`cosine_schedule`).
        unit (`str`): what `units` counts, for the throughput figure `<unit>_per_s` (`"tokens"`, `"samples"`).
        description (`str`): the progress bar's label.
    """

    def __init__(
        self, accelerator, model: torch.nn.Module, scheduler, run: RunFolder, train_args: TrainingArguments, *,
        total_steps: int, num_epochs: int, unit: str, description: str,
    ):
        self.accelerator, self.model, self.scheduler, self.run, self.args = accelerator, model, scheduler, run, train_args
        self.total_steps, self.num_epochs, self.unit = total_steps, num_epochs, unit
        self.run_log = JsonlLogger(run.output_dir / "train_log.jsonl", enabled=accelerator.is_main_process)
        self.position = run.resume(accelerator, model, train_args.resume_from_checkpoint) or LoopPosition()
        self.run_log.restart(self.position.step)
        self.done = self.position.step >= total_steps
        self.interrupted = False
        self.budget_stopped = False  # by --max_train_minutes: the final checkpoint keeps its place, to train on later
        self.units_seen = 0
        self._step_losses: list[dict[str, torch.Tensor]] = []
        self._progress = tqdm(
            total=total_steps, initial=self.position.step, desc=description, disable=not accelerator.is_main_process
        )
        self.start_time = time.time()
        self.paused_seconds = 0.0  # validation time, kept out of the training time and the throughput

    @property
    def step(self) -> int:
        return self.position.step

    def init_trackers(self, project_name: str, *arguments: Any) -> None:
        """With `--report_to`, start the Accelerate trackers with every argument dataclass's fields as the run config."""
        if self.args.report_to:
            config = {k: v for args in arguments for k, v in dataclasses.asdict(args).items()}
            self.accelerator.init_trackers(project_name, config=config)

    def epochs(self) -> Iterator[int]:
        """The epochs left, from the resumed one; stops when the plan is done or the run interrupted."""
        for epoch in range(self.position.epoch, self.num_epochs):
            if self.done or self.interrupted:
                return
            yield epoch

    def batches(self, loader, epoch: int) -> Iterator[Any]:
        """
        The batches of `epoch` not consumed yet (a resumed epoch skips its first ones: a stream reads them again), each
        on the device after seeding its micro-step; stops when the plan is done or the run is interrupted.
        """
        loader.set_epoch(epoch)
        skip = self.position.batches_in_epoch if epoch == self.position.epoch else 0
        self.position.epoch, self.position.batches_in_epoch = epoch, skip
        for batch in self.accelerator.skip_first_batches(loader, skip) if skip else loader:
            # Randomness is a function of the micro-step, so a resumed run repeats it exactly whatever else drew from
            # the generators in between (e.g. the DataLoader's own seed draw).
            set_seed(self.args.seed + self.position.micro_step, device_specific=True)
            self.position.micro_step += 1
            self.position.batches_in_epoch += 1
            yield send_to_device(batch, self.accelerator.device)  # a prepared loader's batches are there already
            if self.done or self.interrupted:
                return

    def after_backward(self, outputs: Any, *, units: int) -> Optional[dict[str, Any]]:
        """
        Call inside `accelerator.accumulate(model)` right after `backward`. On the micro-step that ends an optimizer
        step, clip the gradients, average the losses over micro-batches and processes, and stop the run (raising
        `TrainingDivergedError`, before the optimizer applies anything) when a loss or the gradient norm is not
        finite. Returns that step's record, else None.
        """
        self.units_seen += units * self.accelerator.num_processes
        self._step_losses.append({k: v.detach() for k, v in outputs.items() if k.endswith("loss") and v is not None})
        if not self.accelerator.sync_gradients:
            return None
        next_step = self.position.step + 1
        # Sparse gradients (item tables under row-wise Adagrad, which scales each row itself) are not clipped: torch
        # has no norm of sparse tensors.
        dense = [p for p in self.model.parameters() if p.grad is None or not p.grad.is_sparse]
        grad_norm = self.accelerator.clip_grad_norm_(dense, self.args.max_grad_norm or float("inf"))
        record = {"step": next_step, "epoch": self.position.epoch, **reduce_step_losses(self._step_losses, self.accelerator)}
        record["grad_norm"] = float(grad_norm)
        self._step_losses = []
        # fp16 overflows are the grad scaler's to skip; any other non-finite value stops the run.
        check_finite_step(
            next_step, {k: v for k, v in record.items() if k.endswith("loss")},
            record["grad_norm"] if self.accelerator.mixed_precision != "fp16" else None, self.run.last_checkpoint,
        )
        fault_point("step", next_step)
        return record

    def after_step(self, record: dict[str, Any], **extra: Any) -> None:
        """After the optimizer step: count it, log `record` (+ `extra`), checkpoint when due, stop when asked."""
        self.position.step += 1
        record["lr"] = self.scheduler.get_last_lr()[0]
        record[f"{self.unit}_per_s"] = self.units_per_s
        self.log({**record, **extra})
        self._progress.update(1)
        if self.position.step % self.args.logging_steps == 0 or self.position.step == 1:
            self._progress.set_postfix(loss=f"{record['loss']:.4f}", **{f"{self.unit}_s": f"{record[f'{self.unit}_per_s']:.0f}"})
        self.interrupted = self.args.stop_after_steps is not None and self.position.step >= self.args.stop_after_steps
        if self.budget_spent():
            logger.warning(f"Stopping after step {self.step}: the training time budget ({self.args.max_train_minutes} min) is spent.")
            self.total_steps = self.position.step  # the plan ends here: a final checkpoint, then the outputs
            self.budget_stopped = True
        if self.position.step % self.args.checkpointing_steps == 0 or self.interrupted:
            self.checkpoint()
        self.done = self.position.step >= self.total_steps

    def after_validation(self, value: float, save_best: Callable[[Path], None]) -> bool:
        """
        Track the best validation (`value`, higher is better) for `--load_best_model_at_end`: on a new best, the main
        process writes it with `save_best(folder)` into `<output_dir>/best_model` (atomically); after
        `--early_stopping_patience` validations without one, the run stops. Returns whether `value` is a new best.
        """
        position = self.position
        improved = position.best_metric is None or value > position.best_metric
        if improved:
            position.best_metric, position.best_step, position.validations_since_best = value, position.step, 0
            if self.accelerator.is_main_process:
                with atomic_folder(self.best_model_dir) as folder:
                    save_best(folder)
                    atomic_write_json(folder / BEST_STATE_FILE, {"step": position.step, "metric": value})
            self.accelerator.wait_for_everyone()
        else:
            position.validations_since_best += 1
        patience = getattr(self.args, "early_stopping_patience", 0)
        if patience and position.validations_since_best >= patience:
            logger.warning(f"Early stopping at step {position.step}: no better validation in {patience} (best at step "
                           f"{position.best_step}: {position.best_metric:.4f}).")
            self.done, self.budget_stopped = True, False  # finished: a resume has nothing left to train
        return improved

    @property
    def best_model_dir(self) -> Path:
        return self.run.output_dir / "best_model"

    def load_best_model(
        self, model: torch.nn.Module, load: Optional[Callable[[torch.nn.Module, Path], Any]] = None
    ) -> Optional[int]:
        """
        Load the weights of the best validation into `model` (unwrapped; every process) and return its step, or
        None when there was none. Refuses weights that are not that validation's. `load(model, folder)` reads what
        `after_validation`'s `save_best` wrote (default: a `save_pretrained` folder of `type(model)`).
        """
        if self.position.best_step is None:
            return None
        folder = self.best_model_dir
        saved = read_json(folder / BEST_STATE_FILE) if (folder / BEST_STATE_FILE).is_file() else {}
        if saved.get("step") != self.position.best_step:
            raise RuntimeError(
                f"{folder} holds the weights of step {saved.get('step')}, but the best validation was at step "
                f"{self.position.best_step}: it was changed outside this run; rerun without --load_best_model_at_end."
            )
        if load is not None:
            load(model, folder)
        else:
            model.load_state_dict(type(model).from_pretrained(folder).state_dict())
        logger.info(f"Loaded the weights of the best validation (step {self.position.best_step}) from {folder}.")
        return self.position.best_step

    def log(self, record: dict[str, Any]) -> None:
        """One record (with its `step`) to the JSONL run log and the Accelerate trackers."""
        self.run_log.log(record)
        self.accelerator.log(record, step=record.get("step", self.position.step))

    def checkpoint(self) -> None:
        self.run.save_checkpoint(self.accelerator, self.model, self.position, self.args.checkpoints_total_limit)

    def finish(self) -> float:
        """
        Close the progress bar and, unless the run was interrupted, write the final checkpoint (which also refuses
        non-finite weights, so nothing after it is computed from them). Returns the training seconds.
        """
        self._progress.close()
        seconds = self.train_seconds
        if self.interrupted:
            logger.warning(f"Stopped after step {self.step} as asked (--stop_after_steps); resume with --resume_from_checkpoint latest.")
            return seconds
        if self.budget_stopped:
            logger.warning(f"Stopped after step {self.step} on the time budget; resume with --resume_from_checkpoint "
                           "latest (and a new --max_train_minutes) to train on from there.")
        else:  # the plan is done or validation stopped it early: a resume has nothing left to train
            self.position.epoch, self.position.batches_in_epoch = self.num_epochs, 0
        if self.position.step % self.args.checkpointing_steps != 0:
            self.checkpoint()
        return seconds

    def budget_spent(self) -> bool:
        """Whether `--max_train_minutes` of training time are spent, decided together (every process stops at one step)."""
        if self.args.max_train_minutes is None:
            return False
        spent = torch.tensor(float(self.train_seconds >= 60 * self.args.max_train_minutes), device=self.accelerator.device)
        return bool(self.accelerator.reduce(spent, reduction="sum") > 0)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (validation) does not count as training time, throughput or budget."""
        start = time.time()
        try:
            yield
        finally:
            self.paused_seconds += time.time() - start

    @property
    def train_seconds(self) -> float:
        return time.time() - self.start_time - self.paused_seconds

    @property
    def units_per_s(self) -> float:
        return self.units_seen / max(self.train_seconds, 1e-9)

    def save(self, results: dict[str, Any], save_dir: Path, fill: Callable[[Path], None], hub_args: HubArguments) -> None:
        """
        On the main process: `results.json`, the training curves, and `save_dir` written atomically by `fill(folder)`
        (model or adapter, tokenizer, card); then the push to the hub when asked.
        """
        if not self.accelerator.is_main_process:
            return
        output_dir = self.run.output_dir
        atomic_write_json(output_dir / "results.json", results)
        plot = plot_training_curves(output_dir / "train_log.jsonl", output_dir / "training_curves.png")
        with atomic_folder(save_dir) as folder:
            fill(folder)
        logger.info(f"Saved {save_dir}, curves to {plot}, results to {output_dir / 'results.json'}.")
        if hub_args.push_to_hub:
            url = hub_args.push(save_dir, [output_dir / "results.json", output_dir / "train_log.jsonl", plot])
            logger.info(f"Pushed {save_dir} (with its card and the training metrics) to {url}")

    def close(self) -> None:
        """End the run: every process waits for the others, trackers end, and the run folder is released."""
        finish(self.accelerator)
        self.run.release()


__all__ = ["TrainingLoop", "start_run"]
