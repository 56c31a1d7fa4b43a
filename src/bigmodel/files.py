"""Files written for others to read (exported folders, Hugging Face checkpoints) get the mode
any new file gets.

safetensors writes its files 0600, readable by their owner only, while everything else in an
exported folder is 0644 under the usual umask: a folder copied to a shared disk or served by
another user would then hold weights nobody else can open.
"""

from __future__ import annotations

import os
from pathlib import Path


def readable_as_any_file(path: Path) -> None:
    """Give `path` the mode an ordinary new file gets: 0666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
