"""The command line around Hydra: prompts as typed, and one line for each mistake Hydra finds.

`train.py`, `eval.py` and `generate.py` are `@entry(...)` functions. Around Hydra's own entry
point this adds:

- free-text keys (`prompt=`, `text=`): the value is taken as typed (`prompt=café`,
  `"prompt=Hello, world"`), not parsed by Hydra's override grammar;
- bad input that Hydra itself finds (a misspelt key, an unknown option, an override it cannot
  parse) ends with one line on stderr that names the key and the fix, and exit status 2, as
  bad input found later does (`bigmodel.errors.reports_user_errors`).

It imports no torch or Lightning, so that `--help` stays quick.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from bigmodel.errors import (
    USER_FULL_ERROR,
    UserError,
    fail,
    full_errors,
    mark_failed,
    reports_user_errors,
)


def entry(config_name: str, raw: Sequence[str] = ()) -> Callable[[Callable], Callable[[], Any]]:
    """`@hydra.main` for `configs/<config_name>.yaml` next to the script, plus the above.

    raw: keys whose value is free text, passed to the config exactly as typed.
    """

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        config_dir = Path(inspect.getfile(task)).resolve().parent / "configs"
        hydra_main = hydra.main(
            version_base="1.3", config_path=str(config_dir), config_name=config_name
        )(reports_user_errors(task))  # bad input found before the runner (extras) too

        @functools.wraps(task)
        def main() -> Any:
            # Hydra is asked to raise; what the user asked for is kept (bigmodel.errors)
            if USER_FULL_ERROR not in os.environ:
                os.environ[USER_FULL_ERROR] = os.environ.get("HYDRA_FULL_ERROR", "")
            os.environ["HYDRA_FULL_ERROR"] = "1"
            argv = sys.argv[:]
            sys.argv = [argv[0], *(quote_raw(a, raw) for a in argv[1:])]
            if {"--help", "-h", "--hydra-help"} & set(argv[1:]):
                list_each_group_once()
            ask_the_mode_only_if_set(config_dir)
            try:
                return hydra_main()
            except UserError as e:  # raised before the runner took over (extras, a sweeper)
                if full_errors():
                    raise
                mark_failed(str(e).strip())
                fail(str(e).strip())
            except (ConfigCompositionException, OverrideParseException) as e:
                if full_errors():
                    raise
                fail(explain(e, sys.argv[1:], config_dir, config_name))
            except KeyboardInterrupt as e:  # Ctrl-C, or a sweep / job stopped by a signal
                if full_errors():
                    raise
                stopped(e)
            finally:
                sys.argv = argv

        return main

    return decorate


def stopped(e: KeyboardInterrupt) -> None:
    """End on a signal with one line and status 128 + its number (130 for Ctrl-C)."""
    import signal

    signum = getattr(e, "signum", signal.SIGINT)
    message = getattr(e, "message", "") or "interrupted before anything was saved"
    print(f"stopped by {signal.Signals(signum).name}: {message}", file=sys.stderr, flush=True)
    sys.exit(128 + signum)


# hydra.mode as a config file sets it (`mode: MULTIRUN` under hydra:); early stopping's `mode: min`
# and other keys named mode do not match
_MODE_LINE = re.compile(r"^\s*mode\s*:\s*['\"]?(MULTIRUN|RUN)\b", re.M)


def ask_the_mode_only_if_set(config_dir: Path) -> None:
    """Skip the whole composition Hydra makes only to read `hydra.mode`, when nothing sets it.

    Before each run Hydra composes the full config once to learn `hydra.mode`, then again for
    the run: 0.3 s of every start (`python bench/startup.py`). Unless an override or a config
    file under configs/ names the mode, the answer is None (then `-m` alone decides, as Hydra
    does), so the first composition is asked only then.
    """
    from hydra._internal.hydra import Hydra

    probe = getattr(Hydra.get_mode, "__wrapped__", Hydra.get_mode)

    @functools.wraps(probe)
    def get_mode(self: Hydra, config_name: str | None, overrides: list[str]) -> Any:
        named = any(o.lstrip("+~").startswith("hydra.mode") for o in overrides)
        if named or any(_MODE_LINE.search(p.read_text()) for p in config_dir.rglob("*.yaml")):
            return probe(self, config_name, overrides)
        return None

    Hydra.get_mode = get_mode


def list_each_group_once() -> None:
    """Make `--help` list the config groups in a fraction of the time.

    Hydra's help asks for each group's options (140 questions here) through a fresh deep copy
    of its whole config repository every time: 1.6 of the 2 s `--help` took. The answers cannot
    change within one listing, so each is asked once.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.object_type import ObjectType

    ask = ConfigLoaderImpl.get_group_options
    answers: dict[tuple, list[str]] = {}

    @functools.wraps(ask)
    def get_group_options(
        self: ConfigLoaderImpl,
        group_name: str,
        results_filter: ObjectType | None = ObjectType.CONFIG,
        config_name: str | None = None,
        overrides: list[str] | None = None,
    ) -> list[str]:
        key = (id(self), group_name, results_filter, config_name, tuple(overrides or ()))
        if key not in answers:
            answers[key] = ask(self, group_name, results_filter, config_name, overrides)
        return list(answers[key])

    ConfigLoaderImpl.get_group_options = get_group_options


# --------------------------------------------------------------------------------- free text
def quote_raw(arg: str, raw: Sequence[str]) -> str:
    """`prompt=Hello, world` -> `prompt='Hello, world'`, quoted so Hydra reads it back exactly.

    Left alone: other keys, a value already in quotes, and a list (`text=["a","b"]`).
    """
    key, sep, value = arg.partition("=")
    if not sep or key not in raw:
        return arg
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return arg  # quoted for Hydra already
    if value.startswith("["):
        return arg
    return f"{key}={hydra_quote(value)}"


def hydra_quote(value: str) -> str:
    """A single-quoted Hydra value that parses back to `value` (quotes, `\\`, `${`)."""
    # backslashes are literal except before a quote (and the closing one): double those
    value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    value = value.replace("'", "\\'")
    # `${...}` would be interpolated: escape it (and any backslashes right before it)
    value = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    return f"'{value}'"


# ------------------------------------------------------------------------------------ errors
def explain(e: Exception, args: Sequence[str], config_dir: Path, config_name: str) -> str:
    """One line for an exception Hydra raised on the command's overrides."""
    if isinstance(e, OverrideParseException):
        bad = str(e).splitlines()[0].removeprefix("Error parsing override ").strip("'")
        if "=" not in bad and not bad.startswith(("-", "~")) and bad in args:
            # `model.net.n_layer 2`: the shell split a key from its value
            after = list(args)[list(args).index(bad) + 1 :]
            value = after[0] if after and "=" not in after[0] else "VALUE"
            return (
                f"{bad} has no value: the '=' is missing; write {bad}={value} "
                "(key=value, no spaces around '=')"
            )
        return (
            f"cannot read the override {bad}: quote a value that holds spaces, commas, brackets "
            "or other special characters for Hydra as well as for the shell, "
            f"e.g. \"key='a value, with (brackets)'\""
        )
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options:
        group, _, option = e.missing_cfg_file.rpartition("/")
        # "In 'experiment/baby_gpt': Could not find ..." names the config that asked for it
        parent = str(e).split(": Could not find")[0].removeprefix("In ").strip("'")
        where = f" (asked for by configs/{parent}.yaml)" if parent != config_name else ""
        return (
            f"{group}={option} is not an option{where}; choose one of: {', '.join(e.options)} "
            f"(configs/{group}/)"
        )
    ambiguous = re.match(r"Ambiguous value for argument '(.*?)=(.*)'$", str(e).splitlines()[0])
    if ambiguous:
        key, value = ambiguous.groups()
        return (
            f"{key}={value}: a comma makes a list or a sweep; write {key}=[{value}] for a "
            f"list, \"{key}='{value}'\" for text, or add -m to sweep over the values"
        )
    cause = e.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and " not in " in str(cause):
        key = getattr(cause, "full_key", None) or ""
        if key:
            return unknown_key(key, args, config_dir, config_name)
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())


def unknown_key(key: str, args: Sequence[str], config_dir: Path, config_name: str) -> str:
    """`trainer.max_step=10` -> "trainer has no key max_step; did you mean trainer.max_steps?"."""
    parent, _, name = key.rpartition(".")
    typed = next((a for a in args if a.partition("=")[0].lstrip("~+") == key), key)
    node = _compose_without(key, args, config_dir, config_name)
    if node is not None and parent:
        node = OmegaConf.select(node, parent, default=None)
    if not isinstance(node, DictConfig):
        return f"{typed}: there is no key {key}; check the spelling (python {_script()} --cfg job)"
    keys = [str(k) for k in node.keys() if not str(k).startswith("_")]  # noqa: SIM118
    if not parent:  # top level: config groups are choices too (model=gpt, debug=fdr)
        keys += [p.name for p in config_dir.iterdir() if p.is_dir() and p.name not in keys]
    where = parent or "the config"
    # the arguments of the class a section builds count too (trainer -> lightning's Trainer)
    target = _target_of(node)
    takes = sorted((accepted_keys(target) or set()) - set(keys)) if target is not None else []
    added = f"+{typed}" if "=" in typed else f"+{key}=..."
    if name in takes:
        return (
            f"{typed}: {where} sets no {name}, but {target.__qualname__} takes it: "
            f"add it with {added}"
        )
    close = difflib.get_close_matches(name, keys + takes, n=1, cutoff=0.6)
    if close:
        full = f"{parent}.{close[0]}" if parent else close[0]
        plus = "+" if close[0] in takes else ""
        return f"{typed}: {where} has no key {name}; did you mean {plus}{full}?"
    hint = f"{where} has: {', '.join(sorted(keys))}"
    if target is None:  # a plain section (not the arguments of a class) takes new keys
        hint += f"; {added} adds a new key"
    return f"{typed}: {where} has no key {name} ({hint})"


def _target_of(node: DictConfig) -> Any:
    target = node.get("_target_") if "_target_" in node else None
    if not isinstance(target, str):
        return None
    try:
        return hydra.utils.get_object(target)
    except Exception:
        return None


def accepted_keys(obj: Any) -> set[str] | None:
    """The keyword arguments `obj` takes; None where it takes any (`**kwargs`) or cannot say.

    Nets built from a dataclass config (`GPT(**kwargs)` -> `GPTConfig`) take its fields.
    """
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return None
    names = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if any(p.kind == p.VAR_KEYWORD for p in params):
        config_class = getattr(obj, "config_class", None)
        if not dataclasses.is_dataclass(config_class):
            return None
        names |= {f.name for f in dataclasses.fields(config_class)}
    return names


def _compose_without(key: str, args: Sequence[str], config_dir: Path, config_name: str):
    """The config composed from the other overrides (None if that fails too)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    keep = []
    for a in args:
        if a.startswith("-"):
            continue
        try:
            o = parser.parse_override(a)
        except OverrideParseException:
            continue
        if o.key_or_group != key and not o.is_sweep_override():
            keep.append(a)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(config_dir)):
            return compose(config_name, overrides=keep, return_hydra_config=True)
    except Exception:
        return None


def _script() -> str:
    return Path(sys.argv[0]).name or "train.py"
