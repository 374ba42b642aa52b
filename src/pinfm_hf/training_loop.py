"""The step, checkpoint and resume bookkeeping both recipes share, so each recipe's loop shows only what it trains.

A recipe's loop reads (torchtune style):

```python
loop = TrainingLoop(accelerator, model, scheduler, run, position, ...)
for epoch in loop.epochs():
    for batch in loop.batches(train_loader, epoch):
        with accelerator.accumulate(model):
            outputs = model(**batch)
            accelerator.backward(outputs.loss)
            record = loop.after_backward(outputs, units=int(batch["attention_mask"].sum()))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if record is not None:
            loop.after_step(record)
    ...  # per-epoch evaluation
loop.finish()
```
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Optional

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .checkpointing import LoopPosition, RunFolder, check_finite_step, fault_point
from .training_utils import JsonlLogger, reduce_step_losses


class TrainingLoop:
    """
    Loop position, reproducible randomness, gradient clipping and the finite-loss guard, logging, periodic and final
    checkpoints, and the `--stop_after_steps` interruption, for an Accelerate training loop.

    Args:
        accelerator: the recipe's `Accelerator` (gradient accumulation is its own).
        model, scheduler: prepared by `accelerator`.
        run (`RunFolder`): the claimed run folder, for checkpoints.
        position (`LoopPosition`): where to start (from `run.resume`, or a fresh one).
        total_steps, num_epochs (`int`): the plan (`cosine_schedule`).
        seed (`int`): dropout and sampled negatives are drawn from `seed + micro_step`, so a resumed run repeats them.
        max_grad_norm (`float`): clip at this norm; 0 measures the norm without clipping.
        checkpointing_steps, checkpoints_total_limit (`int`): checkpoint cadence and how many of this run's to keep.
        stop_after_steps (`int`, *optional*): save and stop after this step, as if interrupted (tests).
        run_log (`JsonlLogger`): one record per optimizer step.
        logging_steps (`int`): how often the progress bar shows the loss.
        unit (`str`): what `units` counts, for the throughput figure `<unit>_per_s` (`"tokens"`, `"samples"`).
        description (`str`): the progress bar's label.
    """

    def __init__(
        self,
        accelerator,
        model: torch.nn.Module,
        scheduler,
        run: RunFolder,
        position: LoopPosition,
        *,
        total_steps: int,
        num_epochs: int,
        seed: int,
        max_grad_norm: float,
        checkpointing_steps: int,
        checkpoints_total_limit: int,
        stop_after_steps: Optional[int],
        run_log: JsonlLogger,
        logging_steps: int,
        unit: str,
        description: str,
    ):
        self.accelerator, self.model, self.scheduler, self.run = accelerator, model, scheduler, run
        self.position = position
        self.total_steps, self.num_epochs, self.seed = total_steps, num_epochs, seed
        self.max_grad_norm = max_grad_norm
        self.checkpointing_steps, self.checkpoints_total_limit = checkpointing_steps, checkpoints_total_limit
        self.stop_after_steps, self.run_log, self.logging_steps = stop_after_steps, run_log, logging_steps
        self.unit = unit
        self.done = position.step >= total_steps
        self.interrupted = False
        self.units_seen = 0
        self.start_time = time.time()
        self._step_losses: list[dict[str, torch.Tensor]] = []
        self._progress = tqdm(
            total=total_steps, initial=position.step, desc=description, disable=not accelerator.is_main_process
        )

    @property
    def step(self) -> int:
        return self.position.step

    @property
    def stopped(self) -> bool:
        """The plan is done or the run was asked to stop: leave the loops."""
        return self.done or self.interrupted

    def epochs(self) -> Iterator[int]:
        """The epochs left, from the resumed one."""
        for epoch in range(self.position.epoch, self.num_epochs):
            if self.stopped:
                return
            yield epoch

    def batches(self, loader, epoch: int) -> Iterator[Any]:
        """
        The batches of `epoch` not consumed yet (a resumed epoch skips its first ones), each after seeding its
        micro-step; stops when the plan is done or the run is interrupted.
        """
        loader.set_epoch(epoch)
        skip = self.position.batches_in_epoch if epoch == self.position.epoch else 0
        self.position.epoch, self.position.batches_in_epoch = epoch, skip
        for batch in self.accelerator.skip_first_batches(loader, skip) if skip else loader:
            # Randomness is a function of the micro-step, so a resumed run repeats it exactly whatever else drew from
            # the generators in between (e.g. the DataLoader's own seed draw).
            set_seed(self.seed + self.position.micro_step, device_specific=True)
            self.position.micro_step += 1
            self.position.batches_in_epoch += 1
            yield batch
            if self.stopped:
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
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm or float("inf"))
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
        record[f"{self.unit}_per_s"] = self.units_seen / max(time.time() - self.start_time, 1e-9)
        record.update(extra)
        self.run_log.log(record)
        self.accelerator.log(record, step=self.position.step)
        self._progress.update(1)
        if self.position.step % self.logging_steps == 0 or self.position.step == 1:
            self._progress.set_postfix(loss=f"{record['loss']:.4f}", **{f"{self.unit}_s": f"{record[f'{self.unit}_per_s']:.0f}"})
        self.interrupted = self.stop_after_steps is not None and self.position.step >= self.stop_after_steps
        if self.position.step % self.checkpointing_steps == 0 or self.interrupted:
            self.checkpoint()
        self.done = self.position.step >= self.total_steps

    def checkpoint(self) -> None:
        self.run.save_checkpoint(self.accelerator, self.model, self.position, self.checkpoints_total_limit)

    def finish(self) -> float:
        """
        Close the progress bar and, unless the run was interrupted, write the final checkpoint (which also refuses
        non-finite weights, so nothing after it is computed from them). Returns the training seconds.
        """
        self._progress.close()
        seconds = time.time() - self.start_time
        if not self.interrupted and self.position.step % self.checkpointing_steps != 0:
            self.position.epoch, self.position.batches_in_epoch = self.num_epochs, 0
            self.checkpoint()
        return seconds

    @property
    def units_per_s(self) -> float:
        return self.units_seen / max(time.time() - self.start_time, 1e-9)


__all__ = ["TrainingLoop"]
