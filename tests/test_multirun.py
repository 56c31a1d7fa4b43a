"""Multiruns end like single runs: a signal exits 128 + its number with the sweep's own resume
line, a grid needs no metric to rank by, and every multirun keeps a table of its jobs
(`jobs.csv`) and each failed job's `error.txt`."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests import forkserver
from tests.conftest import ROOT, TINY_LM, run_cli
from tests.test_sweep import TINY_SWEEP, _running_trial_with_steps, load, study_dir


def multirun_dir(root: Path) -> Path:
    (sweep,) = (root / "logs" / "train" / "multiruns").iterdir()
    return sweep


def jobs(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "jobs.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_grid_of_runs_too_short_to_validate_completes_with_its_table(tmp_path):
    """`-m optimizer=adam,sgd trainer.max_steps=5`: no validation ran, and a grid ranks nothing,
    so no job fails for want of val/loss; jobs.csv lists both."""
    proc = run_cli(
        "train.py", "-m", "optimizer=adam,sgd", *TINY_LM, "trainer.max_steps=5", cwd=tmp_path
    )
    assert "was not logged" not in proc.stderr
    sweep = multirun_dir(tmp_path)
    rows = jobs(sweep)
    assert [(r["job"], r["status"], r["val/loss"]) for r in rows] == [
        ("0", "completed", ""),
        ("1", "completed", ""),
    ]
    assert rows[0]["overrides"].startswith("optimizer=adam ")
    assert rows[1]["overrides"].startswith("optimizer=sgd ")
    assert rows[0]["dir"] == str(sweep / "0")
    assert f"2 of 2 jobs completed; the table of jobs: {sweep / 'jobs.csv'}" in proc.stdout


def test_hydra_mode_multirun_without_dash_m_runs_the_grid(tmp_path):
    """The mode Hydra would compose a whole config to read (bigmodel.cli skips that composition
    unless an override or a config file names it): hydra.mode=MULTIRUN alone runs the grid."""
    run_cli(
        "train.py", "hydra.mode=MULTIRUN", "optimizer=adam,sgd", *TINY_LM,
        "trainer.max_steps=2", "test=false", cwd=tmp_path,
    )  # fmt: skip
    assert [r["status"] for r in jobs(multirun_dir(tmp_path))] == ["completed", "completed"]


def test_the_mode_is_read_from_config_files_that_set_it(tmp_path):
    from bigmodel.cli import _MODE_LINE

    assert _MODE_LINE.search("hydra:\n  mode: MULTIRUN\n")
    assert _MODE_LINE.search("hydra:\n  mode: 'RUN'\n")
    assert not _MODE_LINE.search("early_stopping:\n  mode: min\n")
    # the project's own configs set no mode: no run composes its config twice
    assert not any(_MODE_LINE.search(p.read_text()) for p in (ROOT / "configs").rglob("*.yaml"))


def test_a_grid_table_holds_the_metric_of_each_job(tmp_path):
    run_cli(
        "train.py", "-m", "optimizer.lr=1e-3,3e-3", *TINY_LM, "trainer.max_steps=6",
        "test=false", cwd=tmp_path,
    )  # fmt: skip
    sweep = multirun_dir(tmp_path)
    import json

    for row in jobs(sweep):
        want = json.loads((sweep / row["job"] / "metrics.json").read_text())["val/loss"]
        assert float(row["val/loss"]) == pytest.approx(want, rel=1e-5)


def test_a_failing_job_of_a_grid_leaves_its_error_and_its_row(tmp_path):
    proc = run_cli(
        "train.py", "-m", "optimizer.lr=1e-3,-1", *TINY_LM, "trainer.max_steps=2", "test=false",
        cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    sweep = multirun_dir(tmp_path)
    rows = jobs(sweep)
    assert [r["status"] for r in rows][:1] == ["completed"]
    assert rows[1]["status"].startswith("failed: ") and "-1" in rows[1]["status"]
    error = (sweep / "1" / "error.txt").read_text()
    assert "Traceback" in error and "-1" in error
    assert not (sweep / "0" / "error.txt").exists()


def start(args: list[str], root: Path) -> subprocess.Popen:
    env = {**os.environ, "BIGMODEL_ROOT": str(root), "OMP_NUM_THREADS": "1"}
    return forkserver.popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until(proc: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ended before {what}:\n{proc.communicate()[1][-3000:]}"
        if ready():
            return
        time.sleep(0.05)
    raise AssertionError(f"not {what} in {timeout} s")


LONG_TRIALS = [
    "-m",
    *[a for a in TINY_SWEEP if not a.startswith(("trainer.max_steps", "trainer.val_check"))],
    "trainer.max_steps=400",
    "trainer.val_check_interval=100",
    "trainer.log_every_n_steps=1",
    "+logger.csv.flush_logs_every_n_steps=1",
    "hydra.sweeper.n_trials=3",
    "hydra/sweeper/pruner=none",
]


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_in_an_optuna_trial_ends_the_sweep_non_zero_with_its_resume_line(
    tmp_path, sig, status
):
    name = "stopped"
    proc = start([*LONG_TRIALS, f"hydra.sweeper.study_name={name}"], tmp_path)
    wait_until(proc, lambda: _running_trial_with_steps(tmp_path, name, 0, 3), "training trial 0")
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == status, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last == (
        f"stopped by {sig.name}: study {name} saved with 0 of 3 trials done (trials.csv in "
        f"{study_dir(tmp_path, name)}); run the same command to resume it"
    )
    # the trial cut off is owed again; the table of jobs says what happened to it
    assert [t.state for t in load(tmp_path, name).trials] == [TrialState.FAIL]
    assert (study_dir(tmp_path, name) / "trials.csv").is_file()
    assert [r["status"] for r in jobs(study_dir(tmp_path, name))] == [f"stopped by {sig.name}"]
    assert "resume with the same command and ckpt_path=last" not in stderr


def test_ctrl_c_between_optuna_trials_ends_the_sweep_with_its_resume_line(tmp_path):
    """Ctrl-C once trial 0 is recorded, before or as trial 1 starts: still the sweep's line,
    exit 130, trials.csv written, trial 0 counted."""
    name = "between"
    args = [*LONG_TRIALS, "trainer.max_steps=150", f"hydra.sweeper.study_name={name}"]
    proc = start(args, tmp_path)

    def told() -> bool:  # trial 0 recorded COMPLETE (trials.csv is written after each trial)
        table = study_dir(tmp_path, name) / "trials.csv"
        return table.exists() and "COMPLETE" in table.read_text()

    wait_until(proc, told, "trial 0 recorded")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith(f"stopped by SIGINT: study {name} saved")
    study = optuna.load_study(
        study_name=name, storage=f"sqlite:///{study_dir(tmp_path, name) / 'optuna.db'}"
    )
    # the signal lands between the trials (trial 1 not asked for yet) or in trial 1, which is
    # then owed again: either way nothing is left RUNNING
    states = [t.state for t in study.trials]
    assert states in ([TrialState.COMPLETE], [TrialState.COMPLETE, TrialState.FAIL]), states
    assert "1 of 3 trials done" in stderr.strip().splitlines()[-1]
    assert (study_dir(tmp_path, name) / "trials.csv").is_file()


def test_a_signal_in_a_grid_job_ends_the_multirun_non_zero_and_marks_the_job(tmp_path):
    args = ["-m", "optimizer=adam,sgd", *TINY_LM, "trainer.max_steps=400",
            "trainer.val_check_interval=100", "trainer.log_every_n_steps=1",
            "+logger.csv.flush_logs_every_n_steps=1"]  # fmt: skip
    proc = start(args, tmp_path)
    root = tmp_path / "logs" / "train" / "multiruns"

    def training() -> bool:
        found = list(root.glob("*/0/csv/metrics.csv"))
        return bool(found) and found[0].read_text().count("\n") > 3

    wait_until(proc, training, "job 0 training")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    sweep = multirun_dir(tmp_path)
    assert stderr.strip().splitlines()[-1] == (
        f"stopped by SIGINT: the job in {sweep / '0'} saved checkpoints/last.ckpt"
    )
    assert [r["status"] for r in jobs(sweep)] == ["stopped by SIGINT"]
    assert (sweep / "0" / "checkpoints" / "last.ckpt").is_file()
