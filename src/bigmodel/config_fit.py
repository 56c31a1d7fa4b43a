"""Task, data, net and loss fit together: checked from their classes and configs before
anything is built (`check_fit`, called by run.prepare_run), with one line that says what fits.

A DataModule says what its batches are for (`learning`), in a few words (`summary`) and which net
fields it fills (`provides`); a Task says what it learns (`learning`) and which loss classes the
`loss` group may give it (`losses`). The options that would fit are found by reading the config
groups' YAML files (no composition, no import of a model).
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bigmodel.config_checks import missing_keys
from bigmodel.errors import UserError


def check_fit(cfg: DictConfig) -> None:
    """Task, data, net and loss fit together: checked from their classes and configs before
    anything is built, with one line that says what fits.

    - the data's `learning` is the task's (`data=digits` is image classification: a GPT does not
      take it);
    - every `???` field of `model.net` is one the data fills (`provides`): a CNN needs
      `in_channels`, which audio does not give;
    - the loss is one of the task's `losses` (classes); a task without any takes no `loss=`.
    """
    task_cls = _class_of(cfg.get("model"))
    data_cls = _class_of(cfg.get("data"))
    if task_cls is None or data_cls is None:
        return
    learning, data_learning = getattr(task_cls, "learning", ""), getattr(data_cls, "learning", "")
    declared = getattr(data_cls, "provides", None)
    provides = set(declared or ())
    net = cfg.model.get("net") if "net" in cfg.model else None
    needs = [k for k in missing_keys(net) if "." not in k and "[" not in k] if net else []
    data_name, model_name = _choice(cfg, "data"), _choice(cfg, "model")
    summary = getattr(data_cls, "summary", "") or data_learning
    if learning and data_learning and learning != data_learning:
        raise UserError(
            f"{data_name} is {summary}, and {model_name} is a {task_cls.__name__} for "
            f"{learning}: "
            + (_models_for(cfg, data_cls) or _experiments_for(cfg) or "pick data of its kind")
        )
    if declared is not None and any(k not in provides for k in needs):
        lacking = [k for k in needs if k not in provides]
        raise UserError(
            f"{model_name} needs {', '.join('model.net.' + k for k in lacking)}, which {data_name} "
            f"({summary}) does not give (it gives {', '.join(sorted(provides))}): "
            f"{_models_for(cfg, data_cls) or 'set it on the command line'}"
        )
    loss = cfg.get("loss")
    loss_cls = _class_of(loss)
    if loss_cls is None:
        return
    losses = tuple(getattr(task_cls, "losses", ()))
    loss_name = _choice(cfg, "loss")
    if not losses:
        raise UserError(
            f"{loss_name}: a {task_cls.__name__} is trained with its own loss and takes none; "
            f"leave {loss_name} out"
        )
    if not issubclass(loss_cls, losses):
        fitting = [
            f"loss={n}" for n, c in _group_classes(cfg, "loss").items() if issubclass(c, losses)
        ]
        raise UserError(
            f"{loss_name} ({loss_cls.__name__}) does not fit {learning} (a {task_cls.__name__} "
            f"takes {', '.join(c.__name__ for c in losses)})"
            + (f": use {' or '.join(fitting)}" if fitting else "")
        )


def _class_of(node: Any) -> type | None:
    """The class a config node's `_target_` names (None: no node, no target, not a class)."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    try:
        obj = hydra.utils.get_object(str(node._target_))
    except Exception:  # an unknown target: instantiate says so
        return None
    return obj if inspect.isclass(obj) else None


def _choice(cfg: DictConfig, group: str) -> str:
    """How the command names a group's option: `data=digits` (the target's class elsewhere)."""
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get(group)
        if choice:
            return f"{group}={choice}"
    cls = _class_of(cfg.get(group))
    return f"{group} ({cls.__name__})" if cls else group


def _group_files(group: str) -> dict[str, Path]:
    """The options of a config group in this command's config folders: name -> yaml file."""
    if not HydraConfig.initialized():
        return {}
    out: dict[str, Path] = {}
    for source in HydraConfig.get().runtime.config_sources:
        if source.schema != "file" or not source.path:
            continue
        for f in sorted(Path(source.path, group).glob("*.yaml")):
            out.setdefault(f.stem, f)
    return out


def _option_config(group: str, name: str, files: dict[str, Path], depth: int = 0) -> DictConfig:
    """A group option's own config merged over the options of its group it lists under
    `defaults:` (gpt_small over gpt); interpolations are left unresolved."""
    conf = OmegaConf.load(files[name])
    merged = OmegaConf.create()
    for entry in conf.pop("defaults", None) or ():
        if isinstance(entry, str) and entry in files and depth < 8:
            merged = OmegaConf.merge(merged, _option_config(group, entry, files, depth + 1))
    return OmegaConf.merge(merged, conf)


def _group_classes(cfg: DictConfig, group: str) -> dict[str, type]:
    files = _group_files(group)
    out = {}
    for name in files:
        with contextlib.suppress(Exception):  # an option that does not load is not a suggestion
            cls = _class_of(_option_config(group, name, files))
            if cls is not None:
                out[name] = cls
    return out


def _models_for(cfg: DictConfig, data_cls: type) -> str:
    """`use model=cnn or model=vit`: the model options whose task and net fit the data."""
    files = _group_files("model")
    declared = getattr(data_cls, "provides", None)
    fitting = []
    for name in files:
        try:
            model = _option_config("model", name, files)
        except Exception:
            continue
        task = _class_of(model)
        if task is None or getattr(task, "learning", "") != getattr(data_cls, "learning", ""):
            continue
        needs = missing_keys(model.get("net")) if "net" in model else []
        if declared is None or all(k in declared for k in needs if "." not in k):
            fitting.append(f"model={name}")
    return f"use {' or '.join(fitting)}" if fitting else ""


def _experiments_for(cfg: DictConfig) -> str:
    """`use experiment=sft`: the experiments built on this command's data option (their task is
    set by the experiment, not by a model option)."""
    if not HydraConfig.initialized():
        return ""
    data = HydraConfig.get().runtime.choices.get("data")
    names = []
    for name, path in _group_files("experiment").items():
        with contextlib.suppress(Exception):
            defaults = OmegaConf.load(path).get("defaults") or []
            if any(isinstance(d, DictConfig) and d.get("override /data") == data for d in defaults):
                names.append(f"experiment={name}")
    return f"use {' or '.join(names)}" if names else ""
