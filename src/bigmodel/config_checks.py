"""Checks of a composed config before anything runs, and the values only the data can fill.

Each check raises a UserError of one line naming the key and the fix: a value of the wrong type
(`data.batch_size=twelve`), a key the target takes no argument for (`+trainer.max_step=10`), an
unknown precision, samples longer than the net's context. generate.py's keys are checked against
the type hints of the task's `Generation` dataclass instead (`generation_options`).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

from bigmodel.cli import accepted_keys
from bigmodel.errors import UserError

_SIMPLE = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}


def typed_keys() -> set[str]:
    """The config keys this command's overrides set (`data.path=x` -> `data.path`)."""
    if not HydraConfig.initialized():
        return set()
    typed = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)
    return {str(o).partition("=")[0].lstrip("+~") for o in typed}


# --------------------------------------------------------------------------------- mandatory
def check_mandatory(cfg: DictConfig, filled_by_data: str = "model.net.") -> None:
    """A value left `???`, or a key the config lists under `required:`, is refused when not
    given, never silently taken as unset: `experiment=finetune_gpt2` without `model.init_from`
    or `data.path` would train a random GPT-2 on the embedded corpus. (An experiment lists such
    keys under `required:`: a `???` it merges over a group's default is dropped by OmegaConf.)
    The net's `???` fields (vocabulary, classes, input sizes) are the data's to fill."""
    missing = [k for k in missing_keys(cfg) if not k.startswith(filled_by_data)]
    for key in cfg.get("required") or ():
        if key not in missing and OmegaConf.select(cfg, key, default=None) in (None, ""):
            missing.append(str(key))
    if not missing:
        return
    where = ""
    if HydraConfig.initialized():
        experiment = HydraConfig.get().runtime.choices.get("experiment")
        if experiment:
            where = f" (experiment={experiment} needs {'it' if len(missing) == 1 else 'them'})"
    give = " ".join(f"{k}=..." for k in missing)
    raise UserError(f"{', '.join(missing)} must be given{where}; add {give} to the command")


def missing_keys(node: Any, key: str = "") -> list[str]:
    """Every `???` value under node, by its full key."""
    out: list[str] = []
    if isinstance(node, DictConfig):
        for k in node.keys():  # noqa: SIM118 (includes ??? values)
            full = f"{key}.{k}" if key else str(k)
            if OmegaConf.is_missing(node, k):
                out.append(full)
            elif not OmegaConf.is_interpolation(node, k):
                out += missing_keys(node[k], full)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            if OmegaConf.is_missing(node, i):
                out.append(f"{key}[{i}]")
            elif not OmegaConf.is_interpolation(node, i):
                out += missing_keys(node[i], f"{key}[{i}]")
    return out


# ------------------------------------------------------------------------------------- types
def check_types(node: Any, key: str) -> None:
    """Check config values against the type hints of the `_target_` they will be passed to.

    Catches `data.batch_size=twelve` with a message naming the key, before anything runs.
    """
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_types(item, f"{key}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    target = node.get("_target_") if "_target_" in node else None
    hints: dict[str, Any] = {}
    if isinstance(target, str):
        try:
            obj = hydra.utils.get_object(target)
        except Exception:  # unknown target: instantiate reports it
            obj = None
        if obj is not None:
            check_keys(node, key, obj)
        try:
            hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
            if hasattr(obj, "config_class"):  # nets built from a typed dataclass config
                hints = {**typing.get_type_hints(obj.config_class), **hints}
        except Exception:  # odd hints: skip the check
            hints = {}
    for k in node.keys():  # noqa: SIM118 (includes ??? values)
        if (
            k.startswith("_")
            or OmegaConf.is_missing(node, k)
            or OmegaConf.is_interpolation(node, k)
        ):
            child = None
        else:
            child = node[k]
        full = f"{key}.{k}" if key else str(k)
        if isinstance(child, (DictConfig, ListConfig)):
            check_types(child, full)
        elif k in hints and child is not None:
            check_value(full, child, hints[k])


def check_value(key: str, value: Any, hint: Any) -> None:
    """`key=value` must be of a plain type `hint` allows (a bool is no int here)."""
    allowed = _allowed_types(hint)
    ok = allowed is None or (
        isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    )
    if not ok:
        names = " or ".join(t.__name__ for t in allowed)
        raise UserError(f"{key}={value!r} must be {names}; fix the value of {key}")


def check_keys(node: DictConfig, key: str, obj: Any) -> None:
    """Refuse a key the target takes no argument for (`+trainer.max_step=10`), suggesting the
    nearest one it does take, before anything runs."""
    accepted = accepted_keys(obj)
    if accepted is None:
        return
    for k in node.keys():  # noqa: SIM118
        k = str(k)
        if k.startswith("_") or k in accepted:
            continue
        full = f"{key}.{k}" if key else k
        close = difflib.get_close_matches(k, sorted(accepted), n=1, cutoff=0.6)
        name = getattr(obj, "__qualname__", str(obj))
        hint = (
            f"did you mean {key}.{close[0]}?"
            if close
            else f"it takes: {', '.join(sorted(accepted))}"
        )
        raise UserError(f"{full}: {name} takes no argument {k}; {hint}")


def _allowed_types(hint: Any) -> tuple[type, ...] | None:
    """The plain types a config value may have for `hint`; None where the hint says nothing.

    A union counts its plain members only (`lr: float | Tensor` takes a float from a config,
    which cannot hold a tensor); a union without plain members is not checked.
    """
    if hint in _SIMPLE:
        return _SIMPLE[hint]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and args:
        out: tuple[type, ...] = ()
        for a in args:
            if a in _SIMPLE:
                out += _SIMPLE[a]
            elif a is not type(None) and not _is_tensor_type(a):
                return None  # another kind of value (a path, a callable): not ours to judge
        return out or None
    return None


def _is_tensor_type(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, torch.Tensor)


def check_precision(precision: Any) -> None:
    """`precision=17`: one line naming the key and Lightning's names, before any work."""
    from lightning.fabric.plugins.precision.precision import (
        _PRECISION_INPUT_STR,
        _PRECISION_INPUT_STR_ALIAS_CONVERSION,
    )

    names = typing.get_args(_PRECISION_INPUT_STR)
    allowed = (*names, *_PRECISION_INPUT_STR_ALIAS_CONVERSION, "auto")
    if precision is None or str(precision) in allowed:
        return
    raise UserError(
        f"precision={precision} is not one of {', '.join((*names, 'auto'))} (or the short forms "
        f"{', '.join(_PRECISION_INPUT_STR_ALIAS_CONVERSION)})"
    )


# ----------------------------------------------------------------------------- generate.py
def generation_options(cfg: DictConfig, options_class: type, what: str) -> Any:
    """A task's `Generation` dataclass from generate.py's keys, each checked against its field's
    type hint (`max_new_tokens=1.5`: one line naming the key).

    A null value for a field that takes no None leaves the field's default (`beam_size=null`).
    The first field is the input, taken after the checks: `prompt` through `read_prompt`;
    another must be given (else the field's `example` override is shown, after `what`), and a
    text for a list of texts becomes a list of one.
    """
    hints = typing.get_type_hints(options_class)
    first, *rest = dataclasses.fields(options_class)
    refuse_other_options(options_class, what)
    kwargs = {}
    for field in rest:
        value = cfg.get(field.name)
        if value is None and not _takes_none(hints[field.name]):
            continue
        if value is not None:
            check_value(field.name, value, hints[field.name])
        kwargs[field.name] = value
    if first.name == "prompt":
        value = read_prompt(cfg)
    else:
        value = cfg.get(first.name)
        if not value:
            raise UserError(f"{what}; give it {first.metadata.get('example', first.name + '=...')}")
        if hints[first.name] == list[str]:
            value = [value] if isinstance(value, str) else list(value)
    check_value(first.name, value, hints[first.name])
    return options_class(**{first.name: value}, **kwargs)


# generate.py keys that are not options of a task's generation
_GENERAL_KEYS = {"ckpt_path", "device", "task_name"}


def refuse_other_options(options_class: type, what: str) -> None:
    """An option typed on the command line that this model does not take (`beam_size=4` on a
    language model, `temperature=` on a translation model) is refused, not silently ignored."""
    names = [f.name for f in dataclasses.fields(options_class)]
    takes = set(names) | _GENERAL_KEYS | ({"prompt_file"} if names[0] == "prompt" else set())
    other = sorted(k for k in typed_keys() if "." not in k and k not in takes)
    if other:
        raise UserError(
            f"{', '.join(other)}: not an option of this model ({what}); it takes {', '.join(names)}"
        )


def _takes_none(hint: Any) -> bool:
    return hint is type(None) or type(None) in typing.get_args(hint)


def read_prompt(cfg: DictConfig) -> str:
    """The prompt: `prompt=` as typed, `prompt=-` standard input, or `prompt_file=PATH`."""
    path, prompt = cfg.get("prompt_file"), cfg.get("prompt")
    if path:
        if prompt:
            raise UserError(f"give prompt= or prompt_file={path}, not both")
        if not os.path.isfile(path):
            raise UserError(f"prompt_file={path} does not exist; pass a text file")
        from bigmodel.data.sources.text_files import read_text

        return read_text(Path(path), key="prompt_file")
    if prompt == "-":
        return sys.stdin.read()
    if not isinstance(prompt, str):  # prompt=[a,b] or a number Hydra read as one
        return str(prompt)
    return prompt


# ------------------------------------------------------------------------------------- data
# data keys that name files or folders; stored absolute so eval.py finds them from anywhere
_DATA_PATH_KEYS = ("path", "root")


def absolute_data_paths(data: DictConfig) -> None:
    """Make `data.path` / `data.root` absolute (URLs such as hf://... are left alone)."""

    def absolute(value: Any) -> Any:
        if isinstance(value, str) and value and "://" not in value:
            return os.path.abspath(os.path.expanduser(value))
        return value

    with open_dict(data):
        for key in _DATA_PATH_KEYS:
            if key not in data or OmegaConf.is_missing(data, key):
                continue
            value = data[key]
            if isinstance(value, ListConfig):
                data[key] = [absolute(v) for v in value]
            else:
                data[key] = absolute(value)


# net fields the data counts: a net may have room for more (GPT-2's vocabulary padded to 50304),
# never for fewer (an id past the embedding is an IndexError deep in a forward)
_AT_LEAST = ("vocab_size", "num_classes", "src_vocab_size", "tgt_vocab_size")


def fill_from_data(node: DictConfig, values: dict[str, Any]) -> None:
    """Fill the `???` fields of a net config with what only the data knows (vocab, classes);
    a field given on the command line must agree with the data: as large where the data counts
    (`model.net.vocab_size=50` for 65 characters is refused), equal elsewhere."""
    with read_write(node), open_dict(node):
        for key, value in values.items():
            # `in` on a DictConfig is False for ??? values: ask the keys
            if key not in node.keys():  # noqa: SIM118
                continue
            if OmegaConf.is_missing(node, key):
                node[key] = value
                continue
            ours = node[key]
            if not isinstance(ours, int) or isinstance(ours, bool) or not isinstance(value, int):
                continue
            if key in _AT_LEAST and ours < value:
                raise UserError(
                    f"model.net.{key}={ours} is smaller than the data's {key}={value}; leave "
                    f"model.net.{key} out (it follows the data) or set it to {value} or more"
                )
            if key not in _AT_LEAST and ours != value:
                raise UserError(
                    f"model.net.{key}={ours} does not match the data's {key}={value}; leave "
                    f"model.net.{key} out (it follows the data)"
                )


def check_context(cfg: DictConfig) -> None:
    """Samples no longer than the net's context: data.block_size <= model.net.block_size."""
    data = cfg.data.get("block_size")
    net = cfg.model.get("net", {}).get("block_size") if "net" in cfg.model else None
    if isinstance(data, int) and isinstance(net, int) and data > net:
        raise UserError(
            f"data.block_size={data} is longer than the model's context model.net.block_size="
            f"{net}; set data.block_size <= {net} (by default it follows model.net.block_size)"
        )
