"""Lightning's rich progress bar, fit for training by steps, with log lines printed above it."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from rich.file_proxy import FileProxy


class ProgressBar(RichProgressBar):
    """RichProgressBar with three changes.

    The training bar reads `Epoch 3/14` when training by epochs and `Epoch 0 · step 120/5000`
    when `trainer.max_steps` bounds the run (Lightning's own reads `Epoch 0/-2` there: it
    prints max_epochs - 1, and max_epochs is -1 when training by steps).

    On a terminal the bar is a live display that redraws itself below what is printed while it
    runs. Rich redirects `sys.stdout` / `sys.stderr` for that, but logging handlers hold the
    streams they were given at configuration (Hydra's console handler writes to the real stdout),
    so a log line written mid-run (`Trainer.fit stopped: max_steps reached`) landed between two
    draws of the bar and left a copy of its last line behind. While the bar runs, handlers that
    write to the terminal write through rich's redirection instead, above the bar.

    The training bar and its metrics are redrawn at most `refresh_rate` times a second (10
    here; Lightning's 100 redraws at every step of a small model, and each redraw reads every
    metric and renders the bar: 4 % of the baby GPT's step), and always before validation and
    at the end of an epoch or of the run, so the last figures shown are the last ones logged.
    """

    def __init__(self, refresh_rate: int = 10, *args: Any, **kwargs: Any) -> None:
        super().__init__(refresh_rate, *args, **kwargs)
        self._redirected: list[tuple[logging.StreamHandler, Any]] = []
        self._drawn_at = float("-inf")
        self._undrawn: tuple | None = None  # the arguments of a batch end not drawn yet

    # ------------------------------------------------------------------ description
    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        text = f"Epoch {current_epoch}"
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            text += f"/{trainer.max_epochs - 1}"
        if trainer.max_steps is not None and trainer.max_steps > 0:
            total = str(trainer.max_steps)
            text += f" · step {min(trainer.global_step, trainer.max_steps):>{len(total)}}/{total}"
        return f"{text:{len(self.validation_description)}}"

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        now = time.monotonic()
        last = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        if self.refresh_rate > 0 and now - self._drawn_at < 1 / self.refresh_rate and not last:
            self._undrawn = (trainer, pl_module, outputs, batch, idx)
            return
        self._drawn_at, self._undrawn = now, None
        self._draw_train_batch(trainer, pl_module, outputs, batch, idx)

    def _draw_pending(self) -> None:
        if self._undrawn is not None:
            args, self._undrawn = self._undrawn, None
            self._draw_train_batch(*args)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._draw_pending()
        super().on_validation_start(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._draw_pending()
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._draw_pending()
        super().on_train_end(trainer, pl_module)

    def _draw_train_batch(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if (
            self.progress is not None
            and self.train_progress_bar_id is not None
            and trainer.max_steps is not None
            and trainer.max_steps > 0
        ):
            description = self._get_train_description(trainer.current_epoch)
            if self.theme.description:
                description = f"[{self.theme.description}]{description}"
            self.progress.update(self.train_progress_bar_id, description=description)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, idx)

    # ------------------------------------------------------------------ log lines
    def _init_progress(self, trainer: L.Trainer) -> None:
        super()._init_progress(trainer)
        if self.progress is not None and not self._progress_stopped:
            self._redirect_log_handlers()

    def _stop_progress(self) -> None:
        super()._stop_progress()
        self._restore_log_handlers()

    def _redirect_log_handlers(self) -> None:
        for proxy in (sys.stdout, sys.stderr):
            if not isinstance(proxy, FileProxy):  # not a terminal: nothing is redrawn
                continue
            real = proxy.rich_proxied_file
            for handler in _stream_handlers():
                if handler.stream is real:
                    handler.setStream(proxy)
                    self._redirected.append((handler, real))

    def _restore_log_handlers(self) -> None:
        for handler, real in self._redirected:
            if isinstance(handler.stream, FileProxy):
                handler.setStream(real)
        self._redirected.clear()


def _stream_handlers() -> list[logging.StreamHandler]:
    """Every handler of every logger that writes to a stream other than a file."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    seen: dict[int, logging.StreamHandler] = {}
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                seen.setdefault(id(h), h)
    return list(seen.values())
