"""Small run-time helpers: what a run prints about its config, quieting warnings."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import rich
import rich.syntax
import rich.tree
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from bigmodel.errors import UserError
from bigmodel.redact import redact, redact_override
from bigmodel.run_folder import config_name

# How a value the data fills at run time (a `???` net field such as the vocabulary size) prints.
FILLED_AT_RUN_TIME = "??? (filled from the data at run time)"

# Top-level keys printed first, in this order; the rest follow alphabetically.
_ORDER = ("data", "model", "optimizer", "scheduler", "callbacks", "logger", "trainer", "paths")


def print_config(cfg: DictConfig) -> None:
    """Print the composed config as a rich tree, one branch per config group."""
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in _ORDER if k in cfg] + sorted(k for k in cfg if k not in _ORDER)
    for key in keys:
        branch = tree.add(key, style="bold")
        node = cfg[key]
        node = printable(cfg, key)
        if isinstance(node, dict):  # secrets pulled in from the environment are masked
            body = OmegaConf.to_yaml(OmegaConf.create(redact(node)))
        else:
            body = str(redact(node))
        branch.add(rich.syntax.Syntax(body, "yaml", theme="ansi_dark", background_color="default"))
    rich.print(tree)


def printable(node: DictConfig | ListConfig, key: str | int) -> object:
    """`node[key]` resolved to plain data, leaving what is not known yet readable.

    A `???` value, or an interpolation that points at one (the classifier's
    `num_classes: ${model.net.num_classes}` before the data module has counted the classes),
    prints as FILLED_AT_RUN_TIME instead of raising.
    """
    if OmegaConf.is_missing(node, key):
        return FILLED_AT_RUN_TIME
    try:
        child = node[key]
    except (MissingMandatoryValue, InterpolationResolutionError):
        return FILLED_AT_RUN_TIME
    if isinstance(child, DictConfig):
        return {k: printable(child, k) for k in child.keys()}  # noqa: SIM118 (keeps ??? keys)
    if isinstance(child, ListConfig):
        return [printable(child, i) for i in range(len(child))]
    return child


# extras.print_config: what a run prints about its config before it starts
PRINT_CONFIG_CHOICES = ("short", "full", "none")


def print_summary(cfg: DictConfig) -> None:
    """The few lines a user needs: the run directory, the overrides, the option of each group.

    The full config is in the run directory (`.hydra/config.yaml`); `extras.print_config=full`
    prints it here as well.
    """
    if not HydraConfig.initialized():
        print_config(cfg)
        return
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    with contextlib.suppress(ValueError):
        out = out.relative_to(Path.cwd())
    # in the order of the defaults list (Hydra keeps them last-first), plumbing left out
    choices = [
        f"{group}={choice}"
        for group, choice in reversed(hc.runtime.choices.items())
        if choice is not None and not group.startswith("hydra") and (group, choice) not in _PLUMBING
    ]
    # as typed (resolving `${oc.env:...}` would print what it reads), credentials masked
    typed = OmegaConf.to_container(hc.overrides.task, resolve=False)
    overrides = " ".join(redact_override(str(o)) for o in typed) or "none (the defaults)"
    # a folder run again keeps its first config.yaml; this run's is beside it (run_folder)
    saved = f"{out}/{hc.output_subdir}/{config_name()}" if hc.output_subdir else "not saved"
    # plain print: rich would wrap these lines at 80 columns in a pipe
    print(f"{cfg.get('task_name', 'run')}: run directory {out}")
    print(f"  overrides  {overrides}")
    print(f"  options    {' '.join(choices)}")
    print(f"  config     {saved} (extras.print_config=full prints it here)", flush=True)


# group options every run has, not worth a word
_PLUMBING = {
    ("paths", "default"),
    ("extras", "default"),
    ("launcher", "local"),
    ("local", "default"),
}


# The variables that number a process of a distributed run (torchrun, Lightning's launcher for
# ranks > 0, SLURM, LSF; the node for multi-node launches): the first process has none or all 0.
RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def is_first_process() -> bool:
    """Whether this is rank 0 of a distributed run (or the only process): the one that speaks."""
    for var in RANK_VARS:
        with contextlib.suppress(ValueError):
            if int(os.environ.get(var, "0")) != 0:
                return False
    return True


class WarningsOnly(logging.Filter):
    """Pass warnings and errors only: other ranks repeat rank 0's lines, and say only these."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def quiet_other_ranks() -> None:
    """On every rank but the first, the console and log get warnings and errors only."""
    if is_first_process():
        return
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, WarningsOnly) for f in handler.filters):
            handler.addFilter(WarningsOnly())


def apply_extras(cfg: DictConfig) -> None:
    """What a run prints before it starts (rank 0 only: the others start from its command)."""
    quiet_other_ranks()
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    mode = extras.get("print_config", "short")
    mode = {True: "short", False: "none", None: "none"}.get(mode, mode)
    if mode not in PRINT_CONFIG_CHOICES:
        raise UserError(
            f"extras.print_config={mode} is not one of {', '.join(PRINT_CONFIG_CHOICES)}"
        )
    if not is_first_process():
        return
    if mode == "full":
        print_config(cfg)
    elif mode == "short":
        print_summary(cfg)
