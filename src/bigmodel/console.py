"""What a run prints: Lightning's log lines once, through Hydra's logging; none of its noise.

Importing this module (bigmodel.callbacks does, so every command that builds a Trainer has) does
three things, each aimed at one cause:

- `import lightning` attaches a handler of its own to the `lightning` logger (`INFO: ...` on
  stderr) whether or not logging is configured, and the logger also propagates to the root
  logger, where Hydra's handlers print the same record again and write it to the run's log
  file. Where the root logger has handlers (Hydra configured logging), Lightning's own handler
  goes, and the levels Lightning's import set (INFO) give way to the ones Hydra's
  `job_logging` config asks for (debug=... sets DEBUG on `lightning`).
- Two lines Lightning prints on every run, whatever the settings, go: the "💡 Tip" lines that
  advertise its paid services, and "TPU available: False, using: 0 TPU cores" (a machine
  with a TPU still gets the line).
- Lightning's own use of a deprecated torch API (`LeafSpec()`, torch >= 2.10) warns on every
  run; that one warning, from that one module, is ignored. So is ModelCheckpoint's "Checkpoint
  directory ... exists and is not empty": a run directory is used again only to continue it.
"""

from __future__ import annotations

import logging
import re
import warnings

import lightning

RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
# lines Lightning logs on every run that say nothing about this run
DROPPED_PREFIXES = ("💡 Tip:", "TPU available: False, using: 0 TPU cores")


class DropLines(logging.Filter):
    """Drop records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...] = DROPPED_PREFIXES) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def _configured_levels() -> dict[str, object]:
    """The levels Hydra's `job_logging` config gives the Lightning loggers (none: {})."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return {}
        loggers = HydraConfig.get().job_logging.get("loggers") or {}
    except Exception:  # Hydra absent or its config unreadable: keep Lightning's levels
        return {}
    return {
        name: loggers[name]["level"]
        for name in LIGHTNING_LOGGERS
        if name in loggers and (loggers[name] or {}).get("level") is not None
    }


def route_lightning_logs() -> None:
    """Lightning's records reach the root logger's handlers, once; see the module docstring."""
    root = logging.getLogger()
    if root.handlers:  # logging is configured (Hydra's job logging): let records propagate
        top = logging.getLogger("lightning")
        own = getattr(lightning, "_console", None)  # the handler lightning/__init__.py adds
        if own is not None and own in top.handlers:
            top.removeHandler(own)
        for name in LIGHTNING_LOGGERS[1:]:
            # lightning.pytorch and lightning.fabric add a plain StreamHandler and stop
            # propagating when they are imported before logging is configured
            logger = logging.getLogger(name)
            plain = [h for h in logger.handlers if type(h) is logging.StreamHandler]
            if not logger.propagate and plain and len(plain) == len(logger.handlers):
                for h in plain:
                    logger.removeHandler(h)
                logger.propagate = True
        # Lightning's import set INFO on all three; the children follow `lightning` again
        levels = _configured_levels()
        for name in LIGHTNING_LOGGERS:
            logging.getLogger(name).setLevel(levels.get(name, "INFO" if name == "lightning" else 0))
    rank_zero = logging.getLogger(RANK_ZERO_LOGGER)
    if not any(isinstance(f, DropLines) for f in rank_zero.filters):
        rank_zero.addFilter(DropLines())


# C0 controls but tab and newline, DEL, C1 controls: a byte-level BPE model samples any byte,
# and a raw ESC or CR in its text would drive the terminal (colours, cursor moves, overwrites)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with its control characters escaped (`\\x1b`, `\\r`), as a terminal must be shown
    generated text; tabs and newlines stay."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def quiet_dependency_warnings() -> None:
    # lightning/pytorch/utilities/_pytree.py builds `LeafSpec()`, which torch deprecated
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    # ModelCheckpoint warns whenever a run's checkpoint folder holds files; a run directory
    # used again is continued on purpose (resume=auto, ckpt_path=...) and says so in a line
    warnings.filterwarnings(
        "ignore", message=r"Checkpoint directory .* exists and is not empty", category=UserWarning
    )


route_lightning_logs()
quiet_dependency_warnings()
