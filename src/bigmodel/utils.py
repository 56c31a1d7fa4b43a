"""Small run-time helpers: printing the config, quieting warnings."""

from __future__ import annotations

import warnings

import rich
import rich.syntax
import rich.tree
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from bigmodel.loggers import redact

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


def apply_extras(cfg: DictConfig) -> None:
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("print_config"):
        print_config(cfg)
