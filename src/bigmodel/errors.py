"""Bad input: the exception that means "this cannot work", and how a command ends on one.

`UserError` is raised anywhere (nets, data, tasks, the runner). `reports_user_errors` wraps an
entry point: bad input becomes one `error: ...` line on stderr and exit status 2, with
`error.txt` and the line in the run's log file where the run has a directory.

It imports only the standard library at module level (Hydra and OmegaConf when an error is being
reported), so that nets and data modules can raise UserError without loading either.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

# Hydra prints a stripped traceback unless HYDRA_FULL_ERROR=1; bigmodel.cli asks it to raise, and
# keeps what the user asked for here (inherited by the processes a run starts: DDP ranks, sweep
# trials).
USER_FULL_ERROR = "BIGMODEL_USER_HYDRA_FULL_ERROR"


class UserError(Exception):
    """Bad input: a wrong config value, a missing file, an unusable checkpoint.

    Entry points print its message (which names the problem and the fix) without a traceback
    and exit with status 2.
    """


class Stopped(KeyboardInterrupt):
    """A run or a sweep stopped by a signal after saving what it had.

    The command ends with `stopped by <SIGNAL>: <message>` on stderr and exit status 128 + the
    signal's number, so that schedulers and retry logic see a stopped job, not a finished one
    (bigmodel.cli). A KeyboardInterrupt, so that whatever catches Ctrl-C catches it too.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum, self.message = signum, message


def full_errors() -> bool:
    """True when the user set HYDRA_FULL_ERROR=1: raise everything, with its traceback."""
    return os.environ.get(USER_FULL_ERROR, os.environ.get("HYDRA_FULL_ERROR", "")) == "1"


def mark_failed(msg: str) -> None:
    """Leave `error.txt` in the run directory Hydra made, so a failed run is not mistaken for
    one in progress, and the line in its log file (generate.py makes neither)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    if hc.output_subdir is None or not out.is_dir():
        return
    with contextlib.suppress(OSError):
        (out / "error.txt").write_text(msg + "\n", encoding="utf-8")
    # the run's log file too, but not the console: stderr gets the one `error:` line
    log = logging.getLogger("bigmodel")
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, msg, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def fail(msg: str) -> None:
    """The one way a command ends on bad input: `error: <msg>` on stderr, exit status 2."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def is_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (`-m`: a sweep trial)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def root_cause(e: BaseException) -> BaseException:
    """The exception inside Hydra's InstantiationException wrappers (the one that says why)."""
    from hydra.errors import InstantiationException

    while isinstance(e, InstantiationException) and e.__cause__ is not None:
        e = e.__cause__
    return e


def reports_user_errors(fn: Callable) -> Callable:
    """Turn bad input into one clear line on stderr and exit status 2 (no traceback wall).

    Bad input is a UserError, or a config that Hydra or OmegaConf refuse (a ValueError or
    TypeError from a constructor included). In a multirun the error is raised instead, so that a
    sweep records the trial as failed.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            from hydra.errors import InstantiationException
            from omegaconf.errors import OmegaConfBaseException

            reported = (UserError, InstantiationException, OmegaConfBaseException)
            if not isinstance(e, reported):
                raise
            if not isinstance(root_cause(e), (*reported, ValueError, TypeError)):
                raise
            if is_multirun() or full_errors():
                raise
            msg = str(root_cause(e)).strip()
            mark_failed(msg)
            fail(msg)

    return wrapper
