"""Checkpoints: written atomically, found, loaded as plain data, checked, and restored from.

- writing: `AtomicCheckpointIO` (a kill mid-write never leaves a torn file), and the clean-up of
  what a killed write left behind;
- finding: `ckpt_path=last` or a path (`resolve_ckpt_path`), `resume=auto` (the run directory's
  newest intact checkpoint);
- loading and checking: `torch.load(weights_only=True)` only, refusing a checkpoint of another
  model or data, and resuming on the checkpoint's own data settings;
- restoring: the data module and task rebuilt from a checkpoint alone (eval.py, generate.py).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict

from bigmodel.config_checks import typed_keys
from bigmodel.errors import UserError
from bigmodel.pretrained import build as build_pretrained
from bigmodel.pretrained import task_config

log = logging.getLogger("bigmodel")


# ------------------------------------------------------------------------------------ writing
TMP_SUFFIX = ".tmp"


class _WholeWrites:
    """A file for torch.save that keeps the OSError of a failed write.

    torch's zip writer swallows an error raised by a write and fails later with a RuntimeError
    ("unexpected pos ..."), so a full disk or a file-size limit would read as a torch bug. The
    writes here are unbuffered and retried until whole; the first OSError is kept in `error`
    for the caller to report.
    """

    def __init__(self, raw) -> None:
        self.raw, self.error = raw, None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                n = self.raw.write(view[done:])
                if not n:
                    raise OSError(errno.EIO, "a write made no progress")
                done += n
        except OSError as e:
            self.error = self.error or e
            raise
        return done

    def flush(self) -> None:
        self.raw.flush()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` to a temporary file beside the target, fsync, then rename over the target.

    A kill at any moment leaves either the previous file or the new one, never a torn one (a
    rename within a folder is atomic on POSIX file systems). A failed write (disk full, no
    permission) stops the run with one line naming the path; the previous file is kept.
    Remote URLs (s3://, gs://) go through Lightning's own writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb", buffering=0) as f:
                out = _WholeWrites(f)
                try:
                    torch.save(checkpoint, out)
                except RuntimeError:
                    if out.error is None:
                        raise
                    raise out.error from None
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            kept = " (the previous one is kept)" if path.exists() else ""
            raise UserError(
                f"could not write the checkpoint {path}: {e.strerror or e}{kept}; free space on "
                f"its disk, fix the permissions of {path.parent}, or point "
                "callbacks.model_checkpoint.dirpath elsewhere"
            ) from None


def remove_partial_writes(folder: Path) -> None:
    """Delete temporary files that a killed save left behind."""
    for f in folder.glob(f".*.ckpt.*{TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            f.unlink()


# ------------------------------------------------------------------------------------ finding
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


def readable(path: Path) -> bool:
    """Whether a checkpoint file loads as tensors and plain data."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(ckpt, dict) and "state_dict" in ckpt


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint a run directory holds: its `checkpoints/*.ckpt` and
    Lightning's SLURM `hpc_ckpt_*.ckpt`, newest first by modification time; unreadable files
    (a copy cut short) are passed over with a warning."""
    found = [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        if readable(path):
            return path
        log.warning(f"resume=auto: {path} is unreadable (cut short?); trying an older one")
    return None


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
    found = newest_checkpoint(run_dir)
    if found is None:
        return None
    log.info(f"resume=auto: continuing from {found} (resume=never starts afresh)")
    return str(found)


# ----------------------------------------------------------------------- loading, checking
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
    """The resolved run config a checkpoint carries (train.py stores it, credentials masked)."""
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
    missing: list[str] = []
    unexpected: list[str] = []
    if not bad:
        # loading (not comparing key names) applies the nets' renames of older keys; the weights
        # are loaded again from the same checkpoint when the run starts
        try:
            result = model.load_state_dict(ckpt["state_dict"], strict=False)
            missing, unexpected = result.missing_keys, result.unexpected_keys
        except RuntimeError as e:  # a renamed key of another shape
            bad = [str(e).splitlines()[-1].strip()]
    if bad or missing or unexpected:
        if bad:
            what = f"shape of {bad[0]}"
        elif missing:
            what = f"{len(missing)} weights it lacks, such as {missing[0]}"
        else:  # a deeper or wider model: weights this one has no place for
            what = f"{len(unexpected)} weights this model has no place for, such as {unexpected[0]}"
        raise UserError(
            f"{path} does not fit this model ({what}); resume with the model config it was "
            "trained with"
        )


# data keys that describe this machine, not the data: a resumed run keeps its own
_MACHINE_DATA_KEYS = ("num_workers", "pin_memory", "persistent_workers", "cache_dir", "split")


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


# the groups a resumed run continues with as the checkpoint has them, unless its command says
_TRAINING_GROUPS = ("optimizer", "scheduler")


def _flat(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}.{key}"))
    return out


def resume_training_config(cfg: DictConfig, ckpt: dict, path: str) -> None:
    """Resume with the checkpoint's optimizer and schedule, as far as this command leaves them.

    `python train.py ckpt_path=last` after `python train.py optimizer=sgd optimizer.lr=0.1`
    goes on with SGD at lr 0.1, and says so. What this command gives itself wins: an option of
    the group (`optimizer=adam`: all of that option's settings) or a key of it
    (`optimizer.lr=0.01`, `scheduler.scheduler.min_lr_ratio=0.5`); the resumed run applies it
    to the restored state (bigmodel.callbacks.changes). The run's config then says what it
    trains with, and so do the checkpoints it writes.
    """
    saved_cfg = checkpoint_config(ckpt, path)
    typed = typed_keys()
    taken: list[str] = []
    with open_dict(cfg):
        for group in _TRAINING_GROUPS:
            if group in typed or group not in saved_cfg or group not in cfg:
                continue
            saved = saved_cfg[group]
            merged = OmegaConf.create(OmegaConf.to_container(saved)) if saved is not None else None
            if merged is not None:
                for key in sorted(k for k in typed if k.startswith(f"{group}.")):
                    value = OmegaConf.select(cfg, key, default=None)
                    OmegaConf.update(merged, key[len(group) + 1 :], value, force_add=True)
            before, after = _flat(cfg[group], group), _flat(merged, group)
            if before == after:
                continue
            if merged is None:
                taken.append(f"{group}=none")
            else:
                taken += [f"{k}={v}" for k, v in after.items() if before.get(k, object()) != v]
            cfg[group] = merged
    if taken:
        log.info(f"resuming {path} with its own optimizer and schedule: {', '.join(taken)}")


# ---------------------------------------------------------------------------------- restoring
def moved_base(cfg: DictConfig, init_from: Any, path: str) -> None:
    """`model.init_from=DIR` on eval.py, generate.py, export.py, predict.py, serve.py: the
    pretrained model a checkpoint was trained from (the frozen base of LoRA adapters, which the
    checkpoint leaves out) has moved to DIR. The checkpoint's config is pointed there, and so is
    its tokenizer folder where it was the base's."""
    if init_from in (None, ""):
        return
    saved = OmegaConf.select(cfg, "model.init_from", default=None)
    if not saved:
        raise UserError(
            f"model.init_from={init_from}: {path} was not trained from a pretrained model (its "
            "model.init_from is unset), so there is no base to read; leave model.init_from out"
        )
    new = os.path.abspath(os.path.expanduser(str(init_from)))
    if not os.path.exists(new):
        raise UserError(
            f"model.init_from={init_from} does not exist; give the folder (or .ckpt) that the "
            f"base model {saved} moved to"
        )
    if os.path.isdir(new) != os.path.isdir(saved) and os.path.exists(saved):
        raise UserError(f"model.init_from={init_from}: the base {saved} is not of that kind")
    with open_dict(cfg):
        cfg.model.init_from = new
        if OmegaConf.select(cfg, "data.tokenizer", default=None) == saved:
            cfg.data.tokenizer = new
    if new != saved:
        log.info(f"model.init_from: the base model is read from {new} (trained from {saved})")


def restore(ckpt_path: str, data_overrides: DictConfig | None = None, init_from: str | None = None):
    """Rebuild data module and task from a checkpoint alone -> (config, datamodule, task).

    data_overrides: data keys to change (the data moved, another split); init_from: where the
    checkpoint's pretrained base lives now (`moved_base`)."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = checkpoint_config(ckpt, ckpt_path)
    moved_base(cfg, init_from, ckpt_path)
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
    task = hydra.utils.instantiate(task_config(cfg.model), **extra)
    build_pretrained(cfg.model, task, restoring=True)  # a LoRA net's frozen base
    task.run_config = OmegaConf.to_container(cfg, resolve=True)  # what it was trained with
    try:
        task.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise UserError(
            f"{ckpt_path} does not match its own model config: {str(e)[:300]}"
        ) from None
    return cfg, datamodule, task
