"""Logger factories where Lightning's own classes need a decision made first."""

from __future__ import annotations

import logging
import os

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger("bigmodel")


def wandb_logger(**kwargs) -> WandbLogger:
    """A W&B logger that runs online when WANDB_API_KEY is set and offline otherwise.

    Offline runs are written under `save_dir`/wandb and can be uploaded later with `wandb sync`.
    """
    offline = not os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "offline"
    kwargs.setdefault("offline", offline)
    if kwargs["offline"]:
        log.info(
            "W&B runs offline (no WANDB_API_KEY); upload later with: "
            f"wandb sync {kwargs.get('save_dir', '.')}/wandb/offline-run-*"
        )
    return WandbLogger(**kwargs)
