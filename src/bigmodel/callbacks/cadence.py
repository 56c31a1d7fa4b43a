"""Epoch-stepped schedulers in runs that count steps: stepped by validation, or a warning.

`scheduler=plateau` and `scheduler=step` step once an epoch (`interval: epoch`). A language
model run counts steps instead: the default trains 1,000 steps of a 1,634-batch epoch, so an
epoch-stepped scheduler would never act, silently. At the start of training:

- ReduceLROnPlateau, whose job is to react to validations, is stepped after each validation
  (`interval: step`, `frequency:` the validation interval), and the run says so in one line;
- any other epoch-stepped scheduler that cannot act before the run ends (StepLR with a
  step_size of more epochs than the run has) gets one warning naming the fix.
"""

from __future__ import annotations

import logging
import math

import lightning as L
from torch.optim.lr_scheduler import ReduceLROnPlateau

log = logging.getLogger("bigmodel")


class ScheduleCadence(L.Callback):
    """See the module docstring."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        per_epoch = trainer.num_training_batches
        if not per_epoch or math.isinf(per_epoch) or trainer.max_steps is None:
            return
        # optimizer steps one epoch takes, and the epochs this run reaches before it ends
        steps_per_epoch = max(per_epoch // trainer.accumulate_grad_batches, 1)
        max_steps = trainer.max_steps if trainer.max_steps > 0 else None
        epochs = [max_steps / steps_per_epoch] if max_steps else []
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            epochs.append(trainer.max_epochs)
        run_epochs = min(epochs) if epochs else math.inf
        for config in trainer.lr_scheduler_configs:
            if config.interval != "epoch":
                continue
            if isinstance(config.scheduler, ReduceLROnPlateau) and run_epochs < 1:
                every = trainer.val_check_batch
                if not every or math.isinf(every):
                    continue
                config.interval, config.frequency = "step", int(every)
                config.strict = False  # before the first validation there is no metric yet
                if trainer.is_global_zero:
                    log.info(
                        f"scheduler: ReduceLROnPlateau steps after each validation (every "
                        f"{int(every)} steps): this run ends within its first epoch "
                        f"({steps_per_epoch} steps)"
                    )
                continue
            step_size = getattr(config.scheduler, "step_size", None)
            first = step_size * config.frequency if step_size else config.frequency
            if run_epochs < first and trainer.is_global_zero:
                name = type(config.scheduler).__name__
                log.warning(
                    f"scheduler: {name} acts every {first} epochs ({steps_per_epoch} steps "
                    f"each) and this run trains {run_epochs:.3g} epochs: it would never change "
                    f"the lr; step it by steps with scheduler.interval=step and a step_size in "
                    f"steps (scheduler.scheduler.step_size=...)"
                )
