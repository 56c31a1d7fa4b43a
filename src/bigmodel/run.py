"""The runner: config -> data, task, callbacks, loggers, Trainer -> fit -> test -> metrics.

`train.py`, `eval.py` and `generate.py` at the repository root are thin Hydra entry points into
`train`, `evaluate` and `generate` here. What they lean on has a module each: bad input
(bigmodel.errors), checkpoints (bigmodel.checkpoints), config checks (bigmodel.config_checks),
DDP under Hydra (bigmodel.launcher).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from bigmodel.callbacks.best import BestCheckpoints
from bigmodel.callbacks.changes import ResumeChanges
from bigmodel.callbacks.last import LastCheckpoint
from bigmodel.callbacks.resume import ExactResume
from bigmodel.callbacks.sigterm import stopped_by
from bigmodel.checkpoints import (
    AtomicCheckpointIO,
    auto_resume,
    check_same_model,
    load_checkpoint,
    resolve_ckpt_path,
    restore,
    resume_data_config,
    resume_training_config,
)
from bigmodel.config_checks import (
    absolute_data_paths,
    check_context,
    check_mandatory,
    check_precision,
    check_types,
    fill_from_data,
    generation_options,
)
from bigmodel.config_fit import check_fit
from bigmodel.distributed import derive_accumulation
from bigmodel.errors import Stopped, UserError, is_multirun, reports_user_errors, root_cause
from bigmodel.hardware import resolve_precision
from bigmodel.jobs import mark_stopped
from bigmodel.launcher import fresh_process_group, patch_ddp_hydra_launcher
from bigmodel.loggers import flat_config
from bigmodel.pretrained import build as build_pretrained
from bigmodel.pretrained import prepare as prepare_pretrained
from bigmodel.pretrained import prepare_data, task_config
from bigmodel.redact import redact

log = logging.getLogger("bigmodel")

# Resuming another run's checkpoint in this run's own directory is what train.py does by design
# (one directory per run); Lightning's ModelCheckpoint warns about it on every resume.
warnings.filterwarnings("ignore", message="The dirpath has changed from")


# ------------------------------------------------------------------------------- composition
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
    values = getattr(datamodule, "net_kwargs", {})
    declared = getattr(type(datamodule), "provides", None)
    if declared is not None and set(values) != set(declared):  # check_fit reads `provides`
        raise RuntimeError(
            f"{type(datamodule).__name__}.provides={declared} does not name the keys of its "
            f"net_kwargs ({sorted(values)})"
        )
    fill_from_data(cfg.model.net, values)
    check_context(cfg)
    optimizer = hydra.utils.instantiate(cfg.optimizer) if cfg.get("optimizer") else None
    scheduler = None
    if cfg.get("scheduler"):
        scheduler = hydra.utils.instantiate(cfg.scheduler, _convert_="partial")
    extra = {}
    if cfg.get("loss"):  # tasks that take more than one loss get it from the `loss` group
        extra["loss"] = hydra.utils.instantiate(cfg.loss)
    task = hydra.utils.instantiate(
        task_config(cfg.model), optimizer=optimizer, scheduler=scheduler, **extra
    )
    build_pretrained(cfg.model, task)  # model.init_from's weights, LoRA adapters
    return task


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
    accelerator = kwargs.get("accelerator", cfg.trainer.get("accelerator"))
    precision = resolve_precision(cfg.trainer.get("precision"), accelerator)
    check_precision(precision)
    _record_precision(cfg, precision)
    try:
        return hydra.utils.instantiate(cfg.trainer, strategy=strategy, plugins=plugins, **kwargs)
    except InstantiationException as e:  # devices=0, accelerator=tpu without torch_xla, ...
        cause = root_cause(e)
        if isinstance(cause, (MisconfigurationException, ImportError, ValueError)):
            raise UserError(f"trainer: {cause}") from None
        raise


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
    with read_write(cfg), open_dict(cfg):
        cfg.trainer.accumulate_grad_batches = steps
    log.info(
        f"global_batch_size={global_batch}: {cfg.data.batch_size} per device x "
        f"{trainer.num_devices} devices x {trainer.num_nodes} nodes x {steps} accumulation"
    )


def output_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir)


def _metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def _recorded_metrics(out: Path) -> dict[str, float]:
    """The metrics.json a run folder holds already ({} if none, or unreadable)."""
    try:
        recorded = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


# --------------------------------------------------------------------------------- entries
@reports_user_errors
def train(cfg: DictConfig) -> float | None:
    """Train (and by default test) a task; return the value of `optimized_metric`."""
    check_mandatory(cfg)
    with fresh_process_group():
        try:
            return _train(cfg)
        except SIGTERMException:
            if is_multirun():  # the sweep records the job as cut off, and stops with its line
                signum = stopped_by() or signal.SIGTERM
                mark_stopped(signal.Signals(signum).name)
                raise Stopped(
                    signum, f"the job in {output_dir(cfg)} saved checkpoints/last.ckpt"
                ) from None
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


def prepare_run(cfg: DictConfig, out: Path) -> tuple[str | None, dict | None]:
    """Settle this run's config in one step, before anything is built, and check it whole.

    What changes the config happens here and only here: the checkpoint to resume (its data
    settings, and what this command changes of its training), `model.init_from`'s sizes and
    tokenizer, absolute data paths, `precision=auto`'s pick. Then every check (`???` values are
    checked first, by `train`): the types and keys of each group, and that task, data, net and
    loss fit together. The config is read-only afterwards; the one later write is of the net
    fields only the data can count (`fill_from_data`), and of the accumulation the Trainer's
    device count gives.
    Returns the checkpoint to resume (path and contents), if any.
    """
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.task_name)
    if ckpt_path is None and cfg.get("train", True):
        ckpt_path = auto_resume(cfg.get("resume"), out)
    ckpt = load_checkpoint(ckpt_path) if ckpt_path else None

    absolute_data_paths(cfg.data)
    if ckpt is not None:
        resume_data_config(cfg, ckpt, ckpt_path)
        resume_training_config(cfg, ckpt, ckpt_path)
    prepare_pretrained(cfg)  # model.init_from sizes the net and picks the tokenizer
    precision = resolve_precision(cfg.trainer.get("precision"), cfg.trainer.get("accelerator"))
    check_precision(precision)
    _record_precision(cfg, precision)

    check_fit(cfg)
    for group in ("data", "model", "optimizer", "scheduler", "loss", "callbacks", "logger"):
        check_types(task_config(cfg.model) if group == "model" else cfg.get(group), group)
    check_types(cfg.get("trainer"), "trainer")
    if isinstance(cfg.get("strategy"), DictConfig):
        check_types(cfg.strategy, "strategy")
    OmegaConf.set_readonly(cfg, True)
    return ckpt_path, ckpt


def _record_precision(cfg: DictConfig, precision: Any) -> None:
    """precision=auto: the config records the pick."""
    if precision != cfg.trainer.get("precision"):
        with open_dict(cfg):
            cfg.trainer.precision = precision
            if "precision" in cfg:
                cfg.precision = precision


def _train(cfg: DictConfig) -> float | None:
    """Train (and by default test) a task; return the value of `optimized_metric`."""
    t0 = time.perf_counter()
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, ckpt = prepare_run(cfg, out)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    prepare_data(cfg, datamodule)
    if ckpt is not None and type(datamodule).__qualname__ in ckpt:
        datamodule.load_state_dict(ckpt[type(datamodule).__qualname__])
    datamodule.prepare_data()
    datamodule.setup("fit")
    task = build_task(cfg, datamodule)
    if ckpt is not None:
        check_same_model(ckpt, ckpt_path, cfg.model, task)
    callbacks = instantiate_all(cfg.get("callbacks"))
    # what a resume needs to be right, whatever `callbacks` holds: this command's optimizer and
    # schedule settings applied to the restored state, the best-checkpoint record carried over
    callbacks += [ResumeChanges(), BestCheckpoints()]
    # re-seeding goes last, after anything that samples at the same hook (Lightning then moves
    # the checkpoint callbacks after it): the generators a checkpoint is written with are the
    # ones the next batch starts from. last.ckpt goes after the other checkpoint callbacks, so
    # that it records their bookkeeping of the same validation
    callbacks.sort(key=lambda c: (isinstance(c, ExactResume), isinstance(c, LastCheckpoint)))
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
        try:
            trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except ValueError as e:
            if m := re.search(
                r"`val_check_interval` \((\d+)\).*training batches \((\d+)\)", str(e)
            ):
                raise UserError(
                    f"trainer.val_check_interval={m[1]} is more than the {m[2]} training batches "
                    "of an epoch; lower it, or count it across epochs with "
                    "trainer.check_val_every_n_epoch=null"
                ) from None
            raise
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
        elif cfg.get("train", True):  # say so, rather than call the last weights the best
            log.info("no validation saved a best checkpoint: testing the final weights")
        trainer.test(task, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        test_metrics = _metrics(trainer)

    metrics = {**train_metrics, **test_metrics}
    metrics["time/total_s"] = time.perf_counter() - t0
    if trainer.is_global_zero:
        if ckpt is not None:
            # a resumed run, or a finished one run again, that validated less (or not at all)
            # keeps the metrics its folder recorded; what it measured again replaces them
            metrics = {**_recorded_metrics(out), **metrics}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        log.info("metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        logged = ", ".join(sorted(metrics))
        if is_multirun() and cfg.get("train", True) and _sweeper_ranks_jobs():
            # an Optuna sweep has nothing to rank this trial by; a grid needs no metric
            raise UserError(f"optimized_metric={name} was not logged; logged metrics: {logged}")
        # a plain run ends well without it (a run shorter than one validation interval, say):
        # only a sweep ranks runs by it
        log.debug(f"optimized_metric={name} was not logged (logged: {logged})")
        return None
    return metrics[name]


def _sweeper_ranks_jobs() -> bool:
    """Whether this multirun's sweeper ranks its jobs by `optimized_metric` (Hydra's own grid
    sweeper does not)."""
    from hydra.core.hydra_config import HydraConfig

    target = str(HydraConfig.get().sweeper.get("_target_", ""))
    return not target.endswith("BasicSweeper")


def _init_from(cfg: DictConfig) -> str | None:
    """`model.init_from=DIR`: where a checkpoint's pretrained base model lives now."""
    return OmegaConf.select(cfg, "model.init_from", default=None)


@reports_user_errors
def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test a checkpoint on a split of its own data and print the metrics."""
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, "train")
    if ckpt_path is None:
        raise UserError("eval.py needs ckpt_path=PATH (a .ckpt written by train.py, or 'last')")
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    _, datamodule, task = restore(ckpt_path, cfg.get("data"), _init_from(cfg))
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
    # the figures are named after the split they are computed on, in the console table,
    # metrics.csv and metrics.json alike
    task.test_split = (cfg.get("data") or {}).get("split") or "test"
    results = trainer.test(task, datamodule=datamodule)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    if trainer.is_global_zero:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        for k, v in sorted(metrics.items()):
            print(f"{k}: {v:.6g}")
    return metrics


@reports_user_errors
def generate(cfg: DictConfig) -> list[str]:
    """Text from a trained model: a checkpoint and its input (a prompt, sentences) in, text out.

    The task says what it takes: its `Generation` dataclass, built here from the keys of
    generate.yaml, and `generate_texts(tokenizer, options)`.
    """
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, "train")
    if ckpt_path is None:
        raise UserError("generate.py needs ckpt_path=PATH (a .ckpt written by train.py, or 'last')")
    _, datamodule, task = restore(ckpt_path, init_from=_init_from(cfg))
    tokenizer = getattr(datamodule, "tokenizer", None)
    options_class = getattr(task, "Generation", None)
    if tokenizer is None or options_class is None:
        raise UserError(f"{ckpt_path} is a {type(task).__name__}, which does not generate text")
    options = generation_options(cfg, options_class, f"{ckpt_path} is a {type(task).__name__}")
    device = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    task.to(device)
    texts = task.generate_texts(tokenizer, options)
    # one input (a prompt), several samples of it: separated; a list of inputs: a line each
    one_input = isinstance(getattr(options, dataclasses.fields(options)[0].name), str)
    from bigmodel.console import printable  # control characters escaped: any byte is a token

    for i, t in enumerate(texts):
        if one_input and len(texts) > 1:
            print(f"--- sample {i} ---")
        print(printable(t))
    return texts
