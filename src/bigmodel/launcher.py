"""DDP under Hydra: how ranks > 0 are started, and a clean process group for each job.

Lightning starts the other ranks of `strategy=ddp` by re-running the command; under Hydra its
own command line is wrong in a multirun (see `_hydra_subprocess_cmd`). `patch_ddp_hydra_launcher`
swaps ours into Lightning's launchers; the runner calls it before it builds a Trainer, and nothing
else imports this module.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch


def _hydra_subprocess_cmd(local_rank: int) -> tuple[list[str], str]:
    """The command line that starts rank `local_rank` of a DDP run inside a Hydra job.

    Lightning's own version re-runs `sys.argv` with `hydra.run.dir` re-resolved, which in a
    multirun starts a whole new sweep in a new directory on every rank. This one re-runs the
    job's own overrides as a single run in the job's output directory, and writes no log files
    or config copies there: only rank 0 writes into a run directory.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    hc = HydraConfig.get()
    keep = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd")
    argv, flags = sys.argv[1:], []
    for i, arg in enumerate(argv):
        if arg.split("=")[0] in keep:
            flags.append(arg)
            if "=" not in arg and i + 1 < len(argv):
                flags.append(argv[i + 1])
    command = [sys.executable, to_absolute_path(sys.argv[0]), *flags, *hc.overrides.task]
    command += [
        f'hydra.run.dir="{hc.runtime.output_dir}"',
        f"hydra.job.name=train_ddp_process_{local_rank}",
        "hydra.output_subdir=null",
        # rank 0 owns <run dir>/train.log; other ranks log to their console only
        f"hydra.job_logging.handlers.file.filename={os.devnull}",
    ]
    return command, get_original_cwd()


def patch_ddp_hydra_launcher() -> None:
    """Make `strategy=ddp` re-run ranks > 0 correctly under Hydra runs and multiruns."""
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher

    fabric_launcher._hydra_subprocess_cmd = _hydra_subprocess_cmd
    trainer_launcher._hydra_subprocess_cmd = _hydra_subprocess_cmd


@contextlib.contextmanager
def fresh_process_group():
    """Leave no process group or launcher variables behind: the next job of a multirun runs in
    this same process and must start its own DDP world, not reuse the last one's."""
    env = dict(os.environ)
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)
