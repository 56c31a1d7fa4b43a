"""Small run-time helpers: printing the config, quieting warnings."""

from __future__ import annotations

import warnings

import rich
import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf

from bigmodel.loggers import redact

# Top-level keys printed first, in this order; the rest follow alphabetically.
_ORDER = ("data", "model", "optimizer", "scheduler", "callbacks", "logger", "trainer", "paths")


def print_config(cfg: DictConfig) -> None:
    """Print the composed config as a rich tree, one branch per config group."""
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in _ORDER if k in cfg] + sorted(k for k in cfg if k not in _ORDER)
    for key in keys:
        branch = tree.add(key, style="bold")
        node = cfg[key]
        if isinstance(node, DictConfig):  # secrets pulled in from the environment are masked
            body = OmegaConf.to_yaml(
                OmegaConf.create(redact(OmegaConf.to_container(node, resolve=True)))
            )
        else:
            body = str(node)
        branch.add(rich.syntax.Syntax(body, "yaml", theme="ansi_dark", background_color="default"))
    rich.print(tree)


def apply_extras(cfg: DictConfig) -> None:
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("print_config"):
        print_config(cfg)
