"""Save `last.ckpt` when the run is told to stop (SIGTERM: pre-emption, `scancel`, `kill`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("bigmodel")


class SigtermCheckpoint(L.Callback):
    """On SIGTERM, write `<checkpoint dir>/last.ckpt` before the process exits.

    Lightning catches SIGTERM, finishes the current training batch and raises SIGTERMException
    on every rank; this callback saves the full training state then (all ranks take part, as
    sharded strategies need), so `python train.py ... ckpt_path=last` continues from that step.
    The checkpoint records `{"sigterm": true, "step": N}` under this callback's state.
    """

    def __init__(self, filename: str = "last.ckpt") -> None:
        self.filename = filename
        self._saved_at: int | None = None

    def ckpt_path(self, trainer: L.Trainer) -> Path:
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        return Path(dirpath or Path(trainer.default_root_dir) / "checkpoints") / self.filename

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        path = self.ckpt_path(trainer)
        self._saved_at = trainer.global_step
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            log.warning(
                f"SIGTERM: saved {path} at step {trainer.global_step}; resume with ckpt_path=last"
            )

    def state_dict(self) -> dict[str, Any]:
        if self._saved_at is None:
            return {}
        return {"sigterm": True, "step": self._saved_at}
