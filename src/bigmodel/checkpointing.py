"""Checkpoint files that survive a kill: atomic writes, and finding the newest intact one."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from bigmodel.errors import UserError

log = logging.getLogger("bigmodel")

TMP_SUFFIX = ".tmp"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` to a temporary file beside the target, fsync, then rename over the target.

    A kill at any moment leaves either the previous file or the new one, never a torn one (a
    rename within a folder is atomic on POSIX file systems). A failed write (disk full, no
    permission) stops the run with one line naming the path; the previous file is kept.
    Remote URLs (s3://, gs://) go through Lightning's own writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            kept = " (the previous one is kept)" if path.exists() else ""
            raise UserError(
                f"could not write the checkpoint {path}: {e.strerror or e}{kept}; free space on "
                f"its disk, fix the permissions of {path.parent}, or point "
                "callbacks.model_checkpoint.dirpath elsewhere"
            ) from None


def remove_partial_writes(folder: Path) -> None:
    """Delete temporary files that a killed save left behind."""
    for f in folder.glob(f".*.ckpt.*{TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            f.unlink()


def readable(path: Path) -> bool:
    """Whether a checkpoint file loads as tensors and plain data."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(ckpt, dict) and "state_dict" in ckpt


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint a run directory holds: its `checkpoints/*.ckpt` and
    Lightning's SLURM `hpc_ckpt_*.ckpt`, newest first by modification time; unreadable files
    (a copy cut short) are passed over with a warning."""
    found = [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        if readable(path):
            return path
        log.warning(f"resume=auto: {path} is unreadable (cut short?); trying an older one")
    return None
