"""Save `last.ckpt` when the run is told to stop: SIGTERM, SIGINT (Ctrl+C) or SIGUSR1."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from bigmodel.errors import is_multirun

log = logging.getLogger("bigmodel")

# the signal that stopped training in this process (None: none did); run.py exits 128 + it
_stopped_by: int | None = None


def stopped_by() -> int | None:
    return _stopped_by


# whether a training with this callback is running in this process (its signals are ours)
_training = False


def training() -> bool:
    """True while a run trains here: SIGTERM / SIGINT stop it through this callback, so a
    sweep around it leaves them to it (bigmodel.sweep.study)."""
    return _training


def _validated_at_this_batch(trainer: L.Trainer) -> bool:
    loop = trainer.fit_loop.epoch_loop
    try:
        return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except Exception:  # Lightning's internals moved: save as it is
        return False


class SigtermCheckpoint(L.Callback):
    """On SIGTERM, SIGINT or SIGUSR1, finish the current training batch, write
    `<checkpoint dir>/last.ckpt` and stop; the process then exits 128 + the signal's number
    (143, 130, 138), so schedulers and retry logic see that the run did not finish.

    A signal that comes during a validation takes effect when the validation has finished.

    Lightning catches SIGTERM itself; this callback makes SIGINT and SIGUSR1 do the same (not
    SIGUSR1 where Lightning's SLURM auto-requeue has claimed it): their handlers only raise
    Lightning's stop flag, and Lightning raises SIGTERMException on every rank at the next batch
    boundary (rank 0's flag decides under DDP). The save happens then, all ranks taking part as
    sharded strategies need, and a second signal during it only raises the flag again, so it
    cannot tear the file. The checkpoint records `{"sigterm": true, "step": N, "signal": name}`.
    """

    SIGNALS = (signal.SIGINT, signal.SIGUSR1)

    def __init__(self, filename: str = "last.ckpt") -> None:
        self.filename = filename
        self._saved_at: int | None = None
        self._signal: int | None = None
        self._previous: dict[int, Any] = {}
        self._pending = False

    def ckpt_path(self, trainer: L.Trainer) -> Path:
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        return Path(dirpath or Path(trainer.default_root_dir) / "checkpoints") / self.filename

    # ------------------------------------------------------------------------------ handlers
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        global _stopped_by, _training
        _stopped_by = None
        _training = True
        self._trainer = trainer
        for sig in self.SIGNALS:
            current = signal.getsignal(sig)
            if sig == signal.SIGUSR1 and current not in (signal.SIG_DFL, None):
                continue  # Lightning's SLURM requeue (or the user's own handler) owns it
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                return
        with_sigterm = signal.getsignal(signal.SIGTERM)
        self._previous_sigterm = with_sigterm
        signal.signal(signal.SIGTERM, self._note_sigterm)

    def _validating(self) -> bool:
        return self._trainer.validating or self._trainer.sanity_checking

    def _handle(self, signum: int, frame: Any) -> None:
        self._signal = self._signal or signum
        if self._validating():  # let the validation finish: see on_validation_end
            self._pending = True
            return
        self._trainer._signal_connector.received_sigterm = True

    def _note_sigterm(self, signum: int, frame: Any) -> None:
        self._signal = self._signal or signum
        if self._validating():
            self._pending = True
            return
        previous = self._previous_sigterm
        if callable(previous):  # Lightning's own: it raises the stop flag
            previous(signum, frame)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A signal that came during a validation stops the run after it, not halfway through:
        Lightning would stop it mid-way and the resumed run would not finish it, so its metrics
        (and what early stopping and the best checkpoint make of them) would be lost."""
        if not getattr(self, "_pending", False):
            return
        self._pending = False
        previous = self._previous_sigterm
        if self._signal == signal.SIGTERM and callable(previous):
            previous(signal.SIGTERM, None)  # Lightning's own handler, now
        else:
            trainer._signal_connector.received_sigterm = True

    def _restore(self) -> None:
        global _training
        _training = False
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if getattr(self, "_previous_sigterm", None) is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    # ---------------------------------------------------------------------------------- stop
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        global _stopped_by
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            self._restore()
            return
        _stopped_by = self._signal or signal.SIGTERM
        path = self.ckpt_path(trainer)
        self._saved_at = trainer.global_step
        loop = trainer.fit_loop.epoch_loop
        # Lightning counts this batch for its loggers after a validation at it, and counts it
        # again when it resumes from a checkpoint of that moment: save the count it expects
        after_validation = _validated_at_this_batch(trainer)
        loop._batches_that_stepped -= after_validation
        try:
            # a whole checkpoint (optimizer, loops, callbacks): the run continues from it. Our
            # handlers stay: a second signal only re-raises a flag
            trainer.save_checkpoint(path, weights_only=False)
        finally:
            loop._batches_that_stepped += after_validation
            self._restore()
        if trainer.is_global_zero:
            name = signal.Signals(_stopped_by).name
            # a sweep's job is resumed by running the sweep again, which says how at its end
            advice = (
                "the multirun stops"
                if is_multirun()
                else "resume with the same command and ckpt_path=last (or resume=auto in a "
                "fixed run directory)"
            )
            log.warning(f"{name}: saved {path} at step {trainer.global_step}; {advice}")

    def state_dict(self) -> dict[str, Any]:
        if self._saved_at is None:
            return {}
        name = signal.Signals(self._signal or signal.SIGTERM).name
        return {"sigterm": True, "step": self._saved_at, "signal": name}
