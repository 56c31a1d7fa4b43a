"""The runner: config -> data, task, callbacks, loggers, Trainer -> fit -> test -> metrics.

`train.py`, `eval.py` and `generate.py` at the repository root are thin Hydra entry points into
`train`, `evaluate` and `generate` here.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import glob
import inspect
import json
import logging
import os
import signal
import sys
import time
import types
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from bigmodel.callbacks.resume import ExactResume
from bigmodel.callbacks.sigterm import stopped_by
from bigmodel.checkpointing import AtomicCheckpointIO
from bigmodel.cli import accepted_keys, fail, full_errors, mark_failed
from bigmodel.distributed import derive_accumulation, patch_ddp_hydra_launcher
from bigmodel.errors import UserError
from bigmodel.redact import redact

log = logging.getLogger("bigmodel")

# Resuming another run's checkpoint in this run's own directory is what train.py does by design
# (one directory per run); Lightning's ModelCheckpoint warns about it on every resume.
warnings.filterwarnings("ignore", message="The dirpath has changed from")


# ------------------------------------------------------------------------------------ errors
def _is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _root_cause(e: BaseException) -> BaseException:
    while isinstance(e, InstantiationException) and e.__cause__ is not None:
        e = e.__cause__
    return e


def reports_user_errors(fn: Callable) -> Callable:
    """Turn bad input into one clear line on stderr and exit status 2 (no traceback wall).

    In a multirun the error is raised instead, so that a sweep records the trial as failed.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, InstantiationException, OmegaConfBaseException) as e:
            cause = _root_cause(e)
            if not isinstance(
                cause,
                (UserError, InstantiationException, OmegaConfBaseException, ValueError, TypeError),
            ):
                raise
            if _is_multirun() or full_errors():
                raise
            msg = str(cause).strip()
            mark_failed(msg)
            fail(msg)

    return wrapper


# ------------------------------------------------------------------------------- checkpoints
def resolve_ckpt_path(ckpt_path: str | None, log_dir: str | None = None, task_name: str = "train"):
    """`last` means the newest `last.ckpt` of any earlier run (train or debug); else a path."""
    if ckpt_path in (None, ""):
        return None
    if ckpt_path == "last":
        tasks = dict.fromkeys([task_name, "train", "debug"])  # debug=... runs: logs/debug/runs
        patterns = [
            os.path.join(log_dir or "logs", t, "runs", "*", "checkpoints", "last.ckpt")
            for t in tasks
        ]
        found = sorted((f for p in patterns for f in glob.glob(p)), key=os.path.getmtime)
        if not found:
            raise UserError(
                f"ckpt_path=last found no checkpoint matching {' or '.join(patterns)}; train first"
            )
        # stderr: generate.py's standard output is the generated text alone
        print(f"ckpt_path=last: {found[-1]}", file=sys.stderr, flush=True)
        return found[-1]
    if os.path.isdir(ckpt_path):
        if glob.glob(os.path.join(ckpt_path, "*", "*model_states.pt")):
            raise UserError(
                f"ckpt_path={ckpt_path} is a DeepSpeed ZeRO checkpoint folder; make one file of "
                f"it with `python -m bigmodel.convert {ckpt_path}` and pass that"
            )
        raise UserError(
            f"ckpt_path={ckpt_path} is a folder, not a checkpoint file; pass a .ckpt inside it, "
            "such as <run>/checkpoints/last.ckpt"
        )
    if not os.path.isfile(ckpt_path):
        raise UserError(
            f"ckpt_path={ckpt_path} does not exist; pass a .ckpt file written by train.py "
            "(runs keep them in logs/train/runs/<run>/checkpoints/)"
        )
    return ckpt_path


_RESUME_CHOICES = ("auto", "never")


def auto_resume(resume: str | None, run_dir: Path) -> str | None:
    """`resume=auto`: the run directory's newest intact checkpoint, or None to start fresh.

    A run directory holds checkpoints when it is fixed (`hydra.run.dir=...`, or SLURM's job id
    with trainer=slurm) and an earlier run in it was stopped: running the same command again
    continues it.
    """
    resume = resume or "never"
    if resume not in _RESUME_CHOICES:
        raise UserError(f"resume={resume} is not one of {', '.join(_RESUME_CHOICES)}")
    if resume == "never":
        return None
    from bigmodel.checkpointing import newest_checkpoint

    found = newest_checkpoint(run_dir)
    if found is None:
        return None
    log.info(f"resume=auto: continuing from {found} (resume=never starts afresh)")
    return str(found)


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint as plain data (`weights_only=True`: no pickled code runs)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's own message advises weights_only=False, which would run whatever code an
        # untrusted file holds: never relay it
        with open(path, "rb") as f:  # torch writes zip archives: a zip's head, then the rest
            kind = "truncated or corrupt" if f.read(4) == b"PK\x03\x04" else "not a checkpoint"
        raise UserError(
            f"ckpt_path={path} is {kind}: torch cannot read it as tensors and plain data "
            f"({type(e).__name__}); pass an intact .ckpt written by train.py"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(
            f"ckpt_path={path} holds no model state_dict; pass a .ckpt written by train.py"
        )
    return ckpt


def checkpoint_config(ckpt: dict, path: str) -> DictConfig:
    cfg = (ckpt.get("bigmodel") or {}).get("config")
    if not cfg:
        raise UserError(f"{path} carries no bigmodel run config; it was not written by train.py")
    return OmegaConf.create(cfg)


def check_same_model(
    ckpt: dict, path: str, model_cfg: DictConfig, model: L.LightningModule
) -> None:
    """Refuse a checkpoint of another model family or shape with a message saying which."""
    saved = checkpoint_config(ckpt, path).get("model", {})
    if saved.get("_target_") != model_cfg.get("_target_"):
        raise UserError(
            f"{path} was trained as {saved.get('_target_')}, but this run builds "
            f"{model_cfg.get('_target_')}; resume with the same model= option the checkpoint "
            "was trained with"
        )
    saved_net, net = saved.get("net", {}), model_cfg.get("net", {})
    if saved_net.get("_target_") != net.get("_target_"):
        raise UserError(
            f"{path} holds a {saved_net.get('_target_')} net, but this run builds "
            f"{net.get('_target_')}; choose the model= option the checkpoint was trained with"
        )
    own = model.state_dict()
    bad = [k for k, v in ckpt["state_dict"].items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in ckpt["state_dict"]]
    if bad or missing:
        what = f"shape of {bad[0]}" if bad else f"missing {missing[0]}"
        raise UserError(
            f"{path} does not fit this model ({what}); resume with the model config it was "
            "trained with"
        )


# data keys that describe this machine, not the data: a resumed run keeps its own
_MACHINE_DATA_KEYS = ("num_workers", "pin_memory", "persistent_workers", "cache_dir", "split")


def typed_keys() -> set[str]:
    """The config keys this command's overrides set (`data.path=x` -> `data.path`)."""
    if not HydraConfig.initialized():
        return set()
    typed = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)
    return {str(o).partition("=")[0].lstrip("+~") for o in typed}


def resume_data_config(cfg: DictConfig, ckpt: dict, path: str) -> None:
    """Resume on the checkpoint's data: its data settings replace this command's defaults.

    `python train.py ckpt_path=last` after `python train.py data.path=my.txt` continues on
    my.txt. A data setting this command gives itself wins, with a warning naming both values.
    """
    saved = checkpoint_config(ckpt, path).get("data")
    if not isinstance(saved, DictConfig) or cfg.get("data") is None:
        return
    if saved.get("_target_") != cfg.data.get("_target_"):
        raise UserError(
            f"{path} was trained on {saved.get('_target_')} data, but this run loads "
            f"{cfg.data.get('_target_')}; resume with the data= option the checkpoint was "
            "trained with"
        )
    typed, taken = typed_keys(), []
    with open_dict(cfg.data):
        for key, value in saved.items():
            if key in _MACHINE_DATA_KEYS or key.startswith("_"):
                continue
            ours = cfg.data.get(key) if key in cfg.data else None
            if ours == value:
                continue
            if f"data.{key}" in typed:
                log.warning(
                    f"data.{key}={ours} differs from the checkpoint's data.{key}={value}; "
                    "resuming with this command's value"
                )
                continue
            cfg.data[key] = value
            taken.append(f"data.{key}={value}")
    if taken:
        log.info(f"resuming {path} on its own data: {', '.join(taken)}")


# ------------------------------------------------------------------------------- composition
_SIMPLE = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}


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
            allowed = _allowed_types(hints[k])
            ok = allowed is None or (
                isinstance(child, allowed) and not (isinstance(child, bool) and bool not in allowed)
            )
            if not ok:
                names = " or ".join(t.__name__ for t in allowed)
                raise UserError(f"{full}={child!r} must be {names}; fix the value of {full}")


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


def fill_from_data(node: DictConfig, values: dict[str, Any]) -> None:
    """Fill the `???` fields of a net config with what only the data knows (vocab, classes)."""
    with open_dict(node):
        for key, value in values.items():
            # `in` on a DictConfig is False for ??? values: ask the keys
            if key in node.keys() and OmegaConf.is_missing(node, key):  # noqa: SIM118
                node[key] = value


def check_context(cfg: DictConfig) -> None:
    """Samples no longer than the net's context: data.block_size <= model.net.block_size."""
    data = cfg.data.get("block_size")
    net = cfg.model.get("net", {}).get("block_size") if "net" in cfg.model else None
    if isinstance(data, int) and isinstance(net, int) and data > net:
        raise UserError(
            f"data.block_size={data} is longer than the model's context model.net.block_size="
            f"{net}; set data.block_size <= {net} (by default it follows model.net.block_size)"
        )


def instantiate_all(cfg: DictConfig | None) -> list:
    """Instantiate each entry of a group such as `callbacks` or `logger` (None entries skipped)."""
    if not cfg:
        return []
    out = []
    for _, conf in cfg.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            out.append(hydra.utils.instantiate(conf))
    return out


def build_task(cfg: DictConfig, datamodule: L.LightningDataModule) -> L.LightningModule:
    fill_from_data(cfg.model.net, getattr(datamodule, "net_kwargs", {}))
    check_context(cfg)
    optimizer = hydra.utils.instantiate(cfg.optimizer) if cfg.get("optimizer") else None
    scheduler = None
    if cfg.get("scheduler"):
        scheduler = hydra.utils.instantiate(cfg.scheduler, _convert_="partial")
    extra = {}
    if cfg.get("loss"):  # tasks that take more than one loss get it from the `loss` group
        extra["loss"] = hydra.utils.instantiate(cfg.loss)
    return hydra.utils.instantiate(cfg.model, optimizer=optimizer, scheduler=scheduler, **extra)


def build_trainer(cfg: DictConfig, **kwargs) -> L.Trainer:
    """The Trainer from `trainer`, with the `strategy` group (a name or a config) plugged in."""
    patch_ddp_hydra_launcher()  # strategy=ddp re-runs this command for the other ranks
    strategy = cfg.get("strategy") or "auto"
    if isinstance(strategy, DictConfig):
        strategy = hydra.utils.instantiate(strategy)
    plugins = list(hydra.utils.instantiate(cfg.trainer.get("plugins")) or [])
    if not _is_deepspeed(strategy) and not any(isinstance(p, CheckpointIO) for p in plugins):
        # checkpoint files written atomically (DeepSpeed writes folders of shards its own way)
        plugins.append(AtomicCheckpointIO())
    check_precision(cfg.trainer.get("precision"))
    try:
        return hydra.utils.instantiate(cfg.trainer, strategy=strategy, plugins=plugins, **kwargs)
    except InstantiationException as e:  # devices=0, accelerator=tpu without torch_xla, ...
        cause = _root_cause(e)
        if isinstance(cause, (MisconfigurationException, ImportError, ValueError)):
            raise UserError(f"trainer: {cause}") from None
        raise


def check_precision(precision: Any) -> None:
    """`precision=17`: one line naming the key and Lightning's names, before any work."""
    from lightning.fabric.plugins.precision.precision import (
        _PRECISION_INPUT_STR,
        _PRECISION_INPUT_STR_ALIAS_CONVERSION,
    )

    names = typing.get_args(_PRECISION_INPUT_STR)
    if precision is None or str(precision) in (*names, *_PRECISION_INPUT_STR_ALIAS_CONVERSION):
        return
    raise UserError(
        f"precision={precision} is not one of {', '.join(names)} (or the short forms "
        f"{', '.join(_PRECISION_INPUT_STR_ALIAS_CONVERSION)})"
    )


def _is_deepspeed(strategy: Any) -> bool:
    return (
        "deepspeed" in (strategy if isinstance(strategy, str) else type(strategy).__name__).lower()
    )


def set_accumulation(cfg: DictConfig, trainer: L.Trainer) -> None:
    """Derive gradient accumulation from `global_batch_size` (data.batch_size is per device)."""
    global_batch = cfg.get("global_batch_size")
    if global_batch is None:
        return
    steps = derive_accumulation(
        int(global_batch), int(cfg.data.batch_size), trainer.num_devices, trainer.num_nodes
    )
    trainer.accumulate_grad_batches = steps
    with open_dict(cfg):
        cfg.trainer.accumulate_grad_batches = steps
    log.info(
        f"global_batch_size={global_batch}: {cfg.data.batch_size} per device x "
        f"{trainer.num_devices} devices x {trainer.num_nodes} nodes x {steps} accumulation"
    )


def output_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir)


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as flat dotted keys, as trackers show it best."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            flat[prefix] = node

    walk(redact(OmegaConf.to_container(cfg, resolve=True)), "")
    return flat


def _metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


# --------------------------------------------------------------------------------- entries
@contextlib.contextmanager
def _fresh_process_group():
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


@reports_user_errors
def train(cfg: DictConfig) -> float | None:
    """Train (and by default test) a task; return the value of `optimized_metric`."""
    with _fresh_process_group():
        try:
            return _train(cfg)
        except SIGTERMException:
            if _is_multirun():  # the sweeper records the trial as cut off
                raise
            with contextlib.suppress(ValueError):  # saved already: ignore more, on our way out
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
                    signal.signal(sig, signal.SIG_IGN)
            # Lightning's SIGTERMException is a SystemExit without a code, so the stopped run
            # would exit 0 and look finished to schedulers and retry logic: 128 + the signal
            signum = stopped_by() or signal.SIGTERM
            name = signal.Signals(signum).name
            log.warning(
                f"stopped by {name} after saving checkpoints/last.ckpt; exit {128 + signum}"
            )
            sys.exit(128 + signum)


def _train(cfg: DictConfig) -> float | None:
    """Train (and by default test) a task; return the value of `optimized_metric`."""
    t0 = time.perf_counter()
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)

    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.task_name)
    if ckpt_path is None and cfg.get("train", True):
        ckpt_path = auto_resume(cfg.get("resume"), out)
    ckpt = load_checkpoint(ckpt_path) if ckpt_path else None

    absolute_data_paths(cfg.data)
    if ckpt is not None:
        resume_data_config(cfg, ckpt, ckpt_path)
    for group in ("data", "model", "optimizer", "scheduler", "loss", "callbacks", "logger"):
        check_types(cfg.get(group), group)
    check_types(cfg.get("trainer"), "trainer")
    if isinstance(cfg.get("strategy"), DictConfig):
        check_types(cfg.strategy, "strategy")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    if ckpt is not None and type(datamodule).__qualname__ in ckpt:
        datamodule.load_state_dict(ckpt[type(datamodule).__qualname__])
    datamodule.prepare_data()
    datamodule.setup("fit")
    task = build_task(cfg, datamodule)
    if ckpt is not None:
        check_same_model(ckpt, ckpt_path, cfg.model, task)
    callbacks = instantiate_all(cfg.get("callbacks"))
    # re-seeding goes last, after anything that samples at the same hook (Lightning then moves
    # the checkpoint callbacks after it): the generators a checkpoint is written with are the
    # ones the next batch starts from
    callbacks.sort(key=lambda c: isinstance(c, ExactResume))
    loggers = instantiate_all(cfg.get("logger"))
    trainer = build_trainer(
        cfg, callbacks=callbacks, logger=loggers or False, default_root_dir=str(out)
    )
    set_accumulation(cfg, trainer)
    # the config a checkpoint carries, credentials masked
    task.run_config = redact(OmegaConf.to_container(cfg, resolve=True))
    tokenizer = getattr(datamodule, "tokenizer", None)
    if tokenizer is not None and trainer.is_global_zero:  # other DDP ranks share the run dir
        (out / "tokenizer.json").write_text(json.dumps(tokenizer.to_dict()))
    for lg in loggers:
        lg.log_hyperparams(flat_config(cfg))
    n_params = sum(p.numel() for p in task.parameters())
    log.info(f"{type(task.net).__name__}: {n_params / 1e6:.2f} M parameters; run directory {out}")

    if cfg.get("train", True):
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    train_metrics = _metrics(trainer)

    test_metrics: dict[str, float] = {}
    if cfg.get("test", False):
        best = (
            getattr(trainer.checkpoint_callback, "best_model_path", "")
            if cfg.get("train", True)
            else ""
        )
        if best:
            log.info(f"testing the best checkpoint {best}")
        trainer.test(task, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        test_metrics = _metrics(trainer)

    metrics = {**train_metrics, **test_metrics}
    metrics["time/total_s"] = time.perf_counter() - t0
    if trainer.is_global_zero:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        log.info("metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        logged = ", ".join(sorted(metrics))
        if _is_multirun() and cfg.get("train", True):  # a sweep has nothing to rank this trial by
            raise UserError(f"optimized_metric={name} was not logged; logged metrics: {logged}")
        # a plain run ends well without it (a run shorter than one validation interval, say):
        # only a sweep ranks runs by it
        log.debug(f"optimized_metric={name} was not logged (logged: {logged})")
        return None
    return metrics[name]


def restore(ckpt_path: str, data_overrides: DictConfig | None = None):
    """Rebuild data module and task from a checkpoint alone -> (config, datamodule, task)."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = checkpoint_config(ckpt, ckpt_path)
    if data_overrides:
        with open_dict(cfg):
            cfg.data = OmegaConf.merge(
                cfg.data, {k: v for k, v in data_overrides.items() if v is not None}
            )
    datamodule = hydra.utils.instantiate(cfg.data)
    key = type(datamodule).__qualname__
    if key in ckpt:
        datamodule.load_state_dict(ckpt[key])
    with open_dict(cfg):
        cfg.optimizer, cfg.scheduler = None, None
    # the loss the model was trained with, so eval reports the same test/loss
    extra = {"loss": hydra.utils.instantiate(cfg.loss)} if cfg.get("loss") else {}
    task = hydra.utils.instantiate(cfg.model, **extra)
    try:
        task.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise UserError(
            f"{ckpt_path} does not match its own model config: {str(e)[:300]}"
        ) from None
    return cfg, datamodule, task


@reports_user_errors
def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test a checkpoint on a split of its own data and print the metrics."""
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, "train")
    if ckpt_path is None:
        raise UserError("eval.py needs ckpt_path=PATH (a .ckpt written by train.py, or 'last')")
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    _, datamodule, task = restore(ckpt_path, cfg.get("data"))
    datamodule.setup("test")
    if cfg.get("quantize"):  # int8 for CPU inference, tested next to the float32 net
        from bigmodel.quantize import evaluate_quantized

        return evaluate_quantized(
            task,
            datamodule,
            lambda **kw: build_trainer(
                cfg,
                logger=False,
                default_root_dir=str(out),
                accelerator="cpu",
                devices=1,
                **kw,
            ),
            cfg.quantize,
            out,
        )
    loggers = instantiate_all(cfg.get("logger"))
    trainer = build_trainer(cfg, logger=loggers or False, default_root_dir=str(out))
    results = trainer.test(task, datamodule=datamodule)
    # the task logs `test/...`; name the figures after the split they were computed on
    split = (cfg.get("data") or {}).get("split") or "test"
    metrics = {
        (f"{split}/{k[len('test/') :]}" if k.startswith("test/") else k): float(v)
        for k, v in (results[0] if results else {}).items()
    }
    if trainer.is_global_zero:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        for k, v in sorted(metrics.items()):
            print(f"{k}: {v:.6g}")
    return metrics


# generate.py's own keys and the types they take (null is allowed where the config allows it)
_GENERATE_TYPES = {
    "max_new_tokens": int,
    "temperature": float,
    "top_k": int,
    "num_samples": int,
    "seed": int,
    "beam_size": int,
    "length_penalty": float,
    "max_len_ratio": float,
}


def check_generate_types(cfg: DictConfig) -> None:
    """`max_new_tokens=1.5` or `temperature=abc`: one line naming the key, before any work."""
    for key, kind in _GENERATE_TYPES.items():
        value = cfg.get(key)
        if value is None:
            continue
        allowed = _SIMPLE[kind]
        if not isinstance(value, allowed) or isinstance(value, bool):
            names = " or ".join(t.__name__ for t in allowed)
            raise UserError(f"{key}={value!r} must be {names}; fix the value of {key}")


def read_prompt(cfg: DictConfig) -> str:
    """The prompt: `prompt=` as typed, `prompt=-` standard input, or `prompt_file=PATH`."""
    path, prompt = cfg.get("prompt_file"), cfg.get("prompt")
    if path:
        if prompt:
            raise UserError(f"give prompt= or prompt_file={path}, not both")
        if not os.path.isfile(path):
            raise UserError(f"prompt_file={path} does not exist; pass a text file")
        from bigmodel.data.text import read_text

        return read_text(Path(path), key="prompt_file")
    if prompt == "-":
        return sys.stdin.read()
    if not isinstance(prompt, str):  # prompt=[a,b] or a number Hydra read as one
        return str(prompt)
    return prompt


@reports_user_errors
def generate(cfg: DictConfig) -> list[str]:
    """Sample from a trained model: a checkpoint and a prompt in, text out."""
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, "train")
    if ckpt_path is None:
        raise UserError("generate.py needs ckpt_path=PATH (a .ckpt written by train.py, or 'last')")
    check_generate_types(cfg)
    _, datamodule, task = restore(ckpt_path)
    tokenizer = getattr(datamodule, "tokenizer", None)
    if tokenizer is None or not (hasattr(task, "generate_text") or hasattr(task, "translate")):
        raise UserError(f"{ckpt_path} is a {type(task).__name__}, which does not generate text")
    device = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    task.to(device)
    if hasattr(task, "translate"):  # sequence to sequence: text in, its translation out
        if not cfg.get("text"):
            raise UserError(
                f'{ckpt_path} is a translation model; give it text="a sentence" '
                '(or a list: \'text=["one","two"]\')'
            )
        inputs = [cfg.text] if isinstance(cfg.text, str) else list(cfg.text)
        texts = task.translate(
            inputs,
            tokenizer,
            beam_size=cfg.get("beam_size") or 1,
            length_penalty=cfg.get("length_penalty"),
            max_len_ratio=cfg.get("max_len_ratio"),
        )
        for t in texts:
            print(t)
        return texts
    texts = task.generate_text(
        read_prompt(cfg),
        tokenizer,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        num_samples=cfg.num_samples,
        seed=cfg.get("seed"),
    )
    for i, t in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i} ---")
        print(t)
    return texts
