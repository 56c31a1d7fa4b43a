"""`last.ckpt`: the newest training state, written on a cadence of steps and of wall time."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from bigmodel.checkpoints import remove_partial_writes


class LastCheckpoint(ModelCheckpoint):
    """Keep `<dirpath>/last.ckpt` the newest state of the run.

    Written after an optimizer step every `every_n_train_steps` steps and once
    `every_n_minutes` of wall time have passed since the last write (either, both or neither),
    after every validation of fit (so a resumed run does not redo it), and when training ends.
    The cadence bounds what a `kill -9` loses. Lightning's ModelCheckpoint does the writing;
    its own step and time triggers exclude each other, hence these two.
    """

    def __init__(
        self,
        dirpath: str | Path,
        every_n_train_steps: int | None = 100,
        every_n_minutes: float | None = 30.0,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="last",
            monitor=None,
            save_top_k=0,
            save_last=True,
            enable_version_counter=False,
            every_n_epochs=0,
        )
        self.n_steps = every_n_train_steps or 0
        self.n_seconds = (every_n_minutes or 0) * 60
        self._last_write = time.monotonic()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_train_steps=self.n_steps, seconds=self.n_seconds)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and Path(self.dirpath).is_dir():
            remove_partial_writes(Path(self.dirpath))

    def save_now(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or trainer.fast_dev_run:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_write = time.monotonic()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        step = trainer.global_step
        if self._should_skip_saving_checkpoint(trainer) or self._accumulating(trainer):
            return  # saved at this step already, or between the micro-batches of a step
        due = bool(self.n_steps) and step % self.n_steps == 0
        if self.n_seconds:  # every rank must agree, or a sharded save would hang
            late = time.monotonic() - self._last_write >= self.n_seconds
            due = trainer.strategy.broadcast(due or late)
        if due and not self._validation_follows(trainer):
            self.save_now(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_now(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self.save_now(trainer)

    @staticmethod
    def _accumulating(trainer: L.Trainer) -> bool:
        """Whether this batch's gradients wait for the next micro-batch (no step taken)."""
        return trainer.fit_loop.epoch_loop._should_accumulate()

    @staticmethod
    def _validation_follows(trainer: L.Trainer) -> bool:
        """A validation runs right after this batch, and writes last.ckpt at its end."""
        loop = trainer.fit_loop.epoch_loop
        try:
            return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
        except Exception:  # Lightning internals moved: write now; one write too many is harmless
            return False
