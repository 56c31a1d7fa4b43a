"""A multirun's record of its jobs: `jobs.csv` in the multirun folder, `error.txt` in the folder
of each job that failed.

`python train.py -m optimizer=adam,sgd ...` runs a job per combination (Hydra's grid sweeper),
`-m hparams_search=...` a job per Optuna trial. This Hydra callback (configs/hydra/default.yaml)
writes each job's row into the job's folder as `job.json` when it starts ("running") and ends
("completed", "failed", or "stopped by SIGINT" from the runner), and rewrites `jobs.csv` from
every row each time, so the table is whole even when the multirun ends early: a failed job ends
Hydra's grid, a signal ends any sweep. Columns: job number, status, the optimized metric's value,
the job's overrides, its folder.

It imports Hydra and the standard library only: it is built for every command, multirun or not.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import traceback
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger("bigmodel")

ROW = "job.json"
TABLE = "jobs.csv"


class JobTable(Callback):
    """Keeps `<multirun folder>/jobs.csv` and each failed job's `error.txt`."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _multirun():
            write_row(config, "running", None)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not _multirun():
            return
        value = job_return._return_value
        if job_return.status == JobStatus.COMPLETED:
            write_row(config, "completed", value if isinstance(value, (int, float)) else None)
            return
        out = Path(HydraConfig.get().runtime.output_dir)
        if isinstance(value, BaseException) and not (out / "error.txt").exists():
            text = "".join(traceback.format_exception(type(value), value, value.__traceback__))
            (out / "error.txt").write_text(text, encoding="utf-8")
        first = str(value).strip().splitlines()[0] if str(value).strip() else type(value).__name__
        write_row(config, f"failed: {first[:200]}", None)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        table = Path(config.hydra.sweep.dir) / TABLE
        if table.is_file():
            with open(table, newline="") as f:
                rows = list(csv.DictReader(f))
            done = sum(r["status"] == "completed" for r in rows)
            log.info(f"{done} of {len(rows)} jobs completed; the table of jobs: {table}")


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def write_row(config: DictConfig, status: str, value: float | None) -> None:
    """Write this job's row (`job.json` in its folder) and rewrite the multirun's table."""
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    metric = str(config.get("optimized_metric") or "")
    row = {
        "job": hc.job.num,
        "status": status,
        "metric": metric,
        "value": value,
        "overrides": " ".join(hc.overrides.task),
        "dir": str(out),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / ROW).write_text(json.dumps(row), encoding="utf-8")
    write_table(Path(hc.sweep.dir))


def write_table(sweep_dir: Path) -> Path:
    """`jobs.csv` from every job's row under sweep_dir, by job number (a rename: never torn)."""
    rows = []
    for path in sweep_dir.rglob(ROW):
        try:
            rows.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):  # a row being written by a parallel job: next time
            continue
    rows.sort(key=lambda r: r["job"])
    metric = next((r["metric"] for r in rows if r["metric"]), "value")
    table = sweep_dir / TABLE
    tmp = sweep_dir / f".{TABLE}.{os.getpid()}.tmp"  # parallel jobs (joblib) each their own
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", "status", metric, "overrides", "dir"])
        for r in rows:
            value = "" if r["value"] is None else f"{r['value']:.6g}"
            writer.writerow([r["job"], r["status"], value, r["overrides"], r["dir"]])
    tmp.replace(table)
    return table


def mark_stopped(signal_name: str) -> None:
    """The current job was stopped by a signal (after saving): its row says so."""
    if not _multirun():
        return
    hc = HydraConfig.get()
    path = Path(hc.runtime.output_dir) / ROW
    try:
        row = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    row["status"] = f"stopped by {signal_name}"
    path.write_text(json.dumps(row), encoding="utf-8")
    write_table(Path(hc.sweep.dir))
