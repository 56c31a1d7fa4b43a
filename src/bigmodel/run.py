"""The runner: config -> data, task, callbacks, loggers, Trainer -> fit -> test -> metrics.

`train.py`, `eval.py` and `generate.py` at the repository root are thin Hydra entry points into
`train`, `evaluate` and `generate` here.
"""

from __future__ import annotations

import contextlib
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
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from bigmodel.callbacks.resume import ExactResume
from bigmodel.callbacks.sigterm import stopped_by
from bigmodel.checkpointing import AtomicCheckpointIO
from bigmodel.distributed import derive_accumulation, patch_ddp_hydra_launcher
from bigmodel.errors import UserError
from bigmodel.loggers import redact

log = logging.getLogger("bigmodel")


# ------------------------------------------------------------------------------------ errors
def _is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _root_cause(e: BaseException) -> BaseException:
    while isinstance(e, InstantiationException) and e.__cause__ is not None:
        e = e.__cause__
    return e


def _mark_failed(msg: str) -> None:
    """Leave `error.txt` in the run directory Hydra made, so a failed run is not mistaken for
    one in progress (generate.py runs in the current folder and makes none)."""
    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    if hc.output_subdir is None or not out.is_dir():
        return
    with contextlib.suppress(OSError):
        (out / "error.txt").write_text(msg + "\n", encoding="utf-8")


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
            if _is_multirun() or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            msg = str(cause).strip()
            log.error(msg)
            print(f"error: {msg}", file=sys.stderr, flush=True)
            _mark_failed(msg)
            sys.exit(2)

    return wrapper


# ------------------------------------------------------------------------------- checkpoints
def resolve_ckpt_path(ckpt_path: str | None, log_dir: str | None = None, task_name: str = "train"):
    """`last` means the newest `last.ckpt` of any earlier run of this task; else a path."""
    if ckpt_path in (None, ""):
        return None
    if ckpt_path == "last":
        pattern = os.path.join(
            log_dir or "logs", task_name, "runs", "*", "checkpoints", "last.ckpt"
        )
        found = sorted(glob.glob(pattern), key=os.path.getmtime)
        if not found:
            raise UserError(f"ckpt_path=last found no checkpoint matching {pattern}; train first")
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
            hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
            if hasattr(obj, "config_class"):  # nets built from a typed dataclass config
                hints = {**typing.get_type_hints(obj.config_class), **hints}
        except Exception:  # unknown target: instantiate reports it; odd hints: skip the check
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
    return hydra.utils.instantiate(cfg.trainer, strategy=strategy, plugins=plugins, **kwargs)


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
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)

    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.task_name)
    if ckpt_path is None and cfg.get("train", True):
        ckpt_path = auto_resume(cfg.get("resume"), out)
    ckpt = load_checkpoint(ckpt_path) if ckpt_path else None

    for group in ("data", "model", "optimizer", "scheduler", "trainer"):
        check_types(cfg.get(group), group)
    absolute_data_paths(cfg.data)
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
        # a plain run ends well without it (a run shorter than one validation interval, say)
        log.warning(f"optimized_metric={name} was not logged (logged: {logged})")
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
        cfg.prompt,
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
