"""Loggers: factories where Lightning's own classes need a decision made first, and the config as
trackers are given it (flat dotted keys, credentials masked)."""

from __future__ import annotations

import atexit
import csv
import logging
import os
import secrets
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from bigmodel.checkpoints import resolve_ckpt_path
from bigmodel.redact import redact

log = logging.getLogger("bigmodel")

# The run directory keeps its W&B run id here; a run resumed from one of its checkpoints (or in
# the same directory) continues the same W&B run.
WANDB_ID_FILE = "wandb_id.txt"


# ------------------------------------------------------------------------------------ config
def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as flat dotted keys, as trackers show it best; credentials masked."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            flat[prefix] = node

    walk(redact(OmegaConf.to_container(cfg, resolve=True)), "")
    return flat


# --------------------------------------------------------------------------------------- W&B
def _hydra() -> Any:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _sweep_group(hc: Any) -> str | None:
    """In a multirun: the Optuna study's name, else the sweep directory's name."""
    from hydra.types import RunMode

    if hc is None or hc.mode != RunMode.MULTIRUN:
        return None
    return hc.sweeper.get("study_name") or Path(str(hc.sweep.dir)).name


def _resumed_run_dir(ckpt_path: str | None, log_dir: str | None, task_name: str) -> Path | None:
    if not ckpt_path:
        return None
    path = resolve_ckpt_path(ckpt_path, log_dir, task_name)
    # <run dir>/checkpoints/<name>.ckpt
    return Path(path).resolve().parent.parent if path else None


def wandb_run_id(save_dir: Path, resumed_dir: Path | None) -> str:
    """This run directory's W&B id: its own, the resumed run's, or a new one (then kept)."""
    for d in (save_dir, resumed_dir):
        if d is not None and (d / WANDB_ID_FILE).is_file():
            run_id = (d / WANDB_ID_FILE).read_text().strip()
            break
    else:
        alphabet = string.ascii_lowercase + string.digits  # W&B's own id alphabet
        run_id = "".join(secrets.SystemRandom().choices(alphabet, k=8))
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / WANDB_ID_FILE).write_text(run_id + "\n")
    return run_id


_offline_runs: list[str] = []


def _print_sync_commands() -> None:
    for pattern in _offline_runs:
        print(f"W&B ran offline; upload the run with: wandb sync {pattern}", flush=True)


class _FinishingWandbLogger(WandbLogger):
    """Lightning's W&B logger, except that the run is finished by this process when it exits.

    A run left open is finished by W&B's service process, whose closing lines ("You can sync
    this run ...", "Find logs at ...") carry colour codes even into a pipe or a log file, and
    which records the run as finished whatever happened. Finished here, W&B prints them through
    its Python side, which leaves colours out where stderr is not a terminal, and the run is
    marked failed when training did not succeed (Lightning's `finalize` status).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._status: str | None = None
        self._finish_registered = False

    @property
    def experiment(self) -> Any:
        run = WandbLogger.experiment.fget(self)
        if self._experiment is not None and not self._finish_registered:
            # after wandb.init: atexit runs this before W&B's own teardown (last in, first out)
            self._finish_registered = True
            atexit.register(self._finish)
        return run

    def finalize(self, status: str) -> None:
        super().finalize(status)
        self._status = status

    def _finish(self) -> None:
        run = self._experiment
        if run is not None and not getattr(run, "_is_finished", False):
            run.finish(exit_code=0 if self._status == "success" else 1)


def wandb_logger(
    save_dir: str,
    project: str = "bigmodel",
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] | None = None,
    log_model: bool | str = False,
    ckpt_path: str | None = None,
    log_dir: str | None = None,
    task_name: str = "train",
    **kwargs: Any,
) -> WandbLogger:
    """A W&B logger: online when WANDB_API_KEY is set, offline otherwise.

    WANDB_MODE=offline forces offline; WANDB_MODE=online (a `wandb login` key) and runs started
    by a W&B sweep agent (WANDB_SWEEP_ID) are online.

    Names the run after its directory (a sweep trial: `<study>-<trial>`), groups it by sweep or
    experiment, and keeps its W&B id in the run directory so that resuming the run from one of
    its checkpoints continues the same W&B run. Offline runs are written under
    `<run dir>/wandb/`; the `wandb sync` command to upload them is printed when the process ends.
    """
    mode = os.environ.get("WANDB_MODE", "")
    wants = bool(os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_SWEEP_ID"))
    online = mode == "online" or (wants and mode not in ("offline", "disabled", "dryrun"))
    kwargs.setdefault("offline", not online)
    out = Path(save_dir)
    hc = _hydra()
    sweep = _sweep_group(hc)
    if group is None:
        experiment = hc.runtime.choices.get("experiment") if hc is not None else None
        group = sweep or experiment or task_name
    if name is None:
        name = f"{sweep}-{hc.job.num}" if sweep else out.name
    run_id = wandb_run_id(out, _resumed_run_dir(ckpt_path, log_dir, task_name))
    if kwargs["offline"]:
        if not _offline_runs:
            atexit.register(_print_sync_commands)
        _offline_runs.append(f"{out}/wandb/offline-run-*-{run_id}")
        log.info(f"W&B runs offline (no WANDB_API_KEY, or WANDB_MODE=offline): {out}/wandb")
    logger = _FinishingWandbLogger(
        save_dir=str(out),
        project=project,
        name=name,
        group=group,
        tags=list(tags or []),
        log_model=log_model,
        id=run_id,
        resume="allow",
        **kwargs,
    )
    # Lightning passes `anonymous=None` to wandb.init unless asked for more, and W&B (>= 0.22)
    # warns about any anonymous setting ("has no effect"): leave it out when nobody set it
    if logger._wandb_init.get("anonymous", "unset") is None:
        del logger._wandb_init["anonymous"]
    return logger


# ------------------------------------------------------------------------------------ MLflow
def mlflow_logger(tracking_uri: str, **kwargs: Any) -> MLFlowLogger:
    """An MLflow logger; a local `file:` store (mlruns) needs no server: `mlflow ui` reads it.

    MLflow 3 keeps its file store working but asks for an opt-in (MLFLOW_ALLOW_FILE_STORE); a
    local store is this template's default, so it opts in unless told otherwise. Any other
    tracking URI (sqlite:///..., http://server) is used as given.
    """
    if tracking_uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    hc = _hydra()
    if kwargs.get("run_name") is None and hc is not None:
        sweep = _sweep_group(hc)
        kwargs["run_name"] = f"{sweep}-{hc.job.num}" if sweep else Path(hc.runtime.output_dir).name
    return MLFlowLogger(tracking_uri=tracking_uri, **kwargs)


# --------------------------------------------------------------------------------------- CSV
class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing metrics.csv is continued, not deleted, and
    never rewritten in place.

    A run resumed in its own directory (resume=auto) keeps the rows logged before the stop. Rows
    at or after the first step the resumed run logs were written after its checkpoint, in the
    interval the stop lost; they are dropped when the resumed run writes that step again. Every
    rewrite (on resume, or when a new metric widens the header) goes to a temporary file that
    replaces metrics.csv in one rename, so a kill at any moment leaves the old rows or the new.
    """

    def _check_log_dir_exists(self) -> None:
        self._continuing = self._fs.isfile(self.metrics_file_path)
        path = Path(self.metrics_file_path)
        if "file" in self._fs.protocol and path.parent.is_dir():  # a rewrite a kill cut off
            for stale in path.parent.glob(f".{path.name}.*.tmp"):
                stale.unlink(missing_ok=True)

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            fields = list(reader.fieldnames or [])
        # a row cut short by a kill during an append lacks its last fields (DictReader: None)
        if rows and None in rows[-1].values():
            rows.pop()
        return fields, rows

    def _replace(self, fieldnames: list[str], rows: list[dict[str, str]]) -> None:
        local = "file" in self._fs.protocol  # a remote store (s3://...) has no atomic rename
        path = Path(self.metrics_file_path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with self._fs.open(str(tmp) if local else self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
            if local:
                f.flush()
                os.fsync(f.fileno())
        if local:
            os.replace(tmp, path)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        self._replace(fieldnames, self._read()[1])

    def save(self) -> None:
        if getattr(self, "_continuing", False) and self.metrics:
            self._continuing = False
            first = min(m.get("step", 0) for m in self.metrics)
            fields, rows = self._read()
            kept = [r for r in rows if r.get("step") and int(float(r["step"])) < first]
            self.metrics_keys = sorted(set(self.metrics_keys) | set(fields))
            self._replace(self.metrics_keys, kept)
        super().save()


class ContinuingCSVLogger(CSVLogger):
    """Lightning's CSVLogger; resumed in the same run directory, it appends to metrics.csv."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _ContinuingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment
