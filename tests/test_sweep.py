"""Sweeps: plain Hydra multiruns, and Optuna studies that resume, survive failure and prune.

Every sweep runs `train.py -m` as a subprocess on a tiny GPT; the study is read back from its
SQLite storage with Optuna itself.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

from tests import forkserver
from tests.conftest import ROOT, run_cli

# A tiny GPT, and every searched key of gpt_optuna fixed except the learning rate.
TINY_SWEEP = [
    "hparams_search=gpt_optuna",
    "model.net.n_layer=1",
    "model.net.n_head=2",
    "model.net.n_embd=32",
    "model.net.dropout=0.0",
    "model.net.block_size=32",
    "optimizer.weight_decay=0.1",
    "data.batch_size=8",
    "data.max_eval_windows=8",
    "trainer.max_steps=8",
    "trainer.val_check_interval=2",
    "scheduler.scheduler.warmup_steps=2",
    "callbacks.model_checkpoint.save_last=false",
]


def study_dir(root: Path, name: str) -> Path:
    return root / "logs" / "train" / "multiruns" / name


def load(root: Path, name: str) -> optuna.Study:
    url = f"sqlite:///{study_dir(root, name) / 'optuna.db'}"
    return optuna.load_study(study_name=name, storage=url)


def states(study: optuna.Study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def test_grid_multirun_one_dir_per_job(tmp_path):
    from tests.conftest import TINY_LM

    run_cli(
        "train.py",
        "-m",
        "optimizer=adam,sgd",
        "optimizer.lr=1e-3,3e-3",
        *TINY_LM,
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "test=false",
        cwd=tmp_path,
    )
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        assert (job / "metrics.json").is_file()
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        seen.add((cfg.optimizer._target_.rsplit(".", 1)[-1], cfg.optimizer.lr))
    assert seen == {("Adam", 1e-3), ("Adam", 3e-3), ("SGD", 1e-3), ("SGD", 3e-3)}


@pytest.mark.slow  # CI's slow tier
def test_optuna_sweep_stops_and_resumes_to_exactly_n_trials(tmp_path):
    name = "resume"
    args = [
        "-m",
        *TINY_SWEEP,
        f"hydra.sweeper.study_name={name}",
        "hydra.sweeper.n_trials=6",
        "hydra/sweeper/pruner=none",
    ]
    # the first invocation stops after 3 trials, as a killed or time-limited sweep would
    run_cli(
        "train.py",
        *args,
        "hydra.sweeper.max_trials_per_run=3",
        "hydra.sweeper.plots=false",
        cwd=tmp_path,
    )
    assert states(load(tmp_path, name)) == {"COMPLETE": 3}

    proc = run_cli("train.py", *args, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert "3 of 6 trials done; running 3" in log
    # Optuna's heartbeat features are ours to use: no ExperimentalWarning for them; one model
    # summary, the first trial's
    assert "ExperimentalWarning" not in log
    assert log.count("Trainable params") == 1
    study = load(tmp_path, name)
    assert states(study) == {"COMPLETE": 6}
    assert [t.number for t in study.trials] == list(range(6))
    # one run directory per trial, named by trial number, each with its own metrics
    out = study_dir(tmp_path, name)
    assert sorted(int(p.name) for p in out.iterdir() if p.name.isdigit()) == list(range(6))
    lrs = {
        OmegaConf.load(out / str(t.number) / ".hydra" / "config.yaml").optimizer.lr
        for t in study.trials
    }
    assert lrs == {t.params["optimizer.lr"] for t in study.trials}
    assert len(lrs) == 6

    # summary: best value and parameters, a command that reproduces the best run, all trials
    summary = OmegaConf.load(out / "optimization_results.yaml")
    assert summary.best_value == pytest.approx(study.best_value)
    assert summary.best_trial == study.best_trial.number
    assert f"optimizer.lr={study.best_params['optimizer.lr']}" in summary.command
    assert "hparams_search=gpt_optuna" in summary.command
    with (out / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["number"]) for r in rows] == list(range(6))
    assert all(r["state"] == "COMPLETE" for r in rows)
    # 8 steps, validated every 2: the pruner's steps are validations, the training step is kept
    assert all(r["last_validation"] == "4" and r["global_step"] == "8" for r in rows)
    for plot in ("optimization_history", "param_importances", "parallel_coordinate"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 1000

    # a third run finds nothing owed: no trial is run or counted twice
    proc = run_cli("train.py", *args, cwd=tmp_path)
    assert "6 of 6 trials done; running 0" in proc.stdout + proc.stderr
    assert len(load(tmp_path, name).trials) == 6

    # the best run's command reproduces its value (same seed, same data)
    best_args = summary.command.split()[2:]
    run_cli("train.py", *best_args, cwd=tmp_path)
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    metrics = OmegaConf.load(run / "metrics.json")
    assert metrics["val/loss"] == pytest.approx(study.best_value, rel=1e-4)


def test_failed_trials_are_recorded_and_the_pruner_prunes(tmp_path):
    name = "failprune"
    run_cli(
        "train.py",
        "-m",
        *TINY_SWEEP,
        f"hydra.sweeper.study_name={name}",
        "hydra.sweeper.n_trials=6",
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=3",
        # 3 heads do not divide 32 channels: those trials raise
        "model.net.n_head=choice(2,3)",
        # a learning rate too small to learn: those trials fall behind and are pruned
        "optimizer.lr=choice(0.01,0.0000001)",
        "hydra/sweeper/pruner=median",
        "hydra.sweeper.pruner.n_startup_trials=1",
        "hydra.sweeper.pruner.n_warmup_steps=0",
        cwd=tmp_path,
    )
    study = load(tmp_path, name)
    counts = states(study)
    assert sum(counts.values()) == 6, counts
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert failed and all(t.params["model.net.n_head"] == 3 for t in failed)
    assert all("divisible by n_head" in t.user_attrs["error"] for t in failed)
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned, counts
    for t in pruned:
        # pruned after its first report, before training ended (4 validations)
        assert t.params["optimizer.lr"] == 1e-7
        assert len(t.intermediate_values) < 4
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert complete and all(t.params["model.net.n_head"] == 2 for t in complete)
    # the traceback of a failed trial is kept in its run directory
    assert (
        "divisible by n_head"
        in (study_dir(tmp_path, name) / str(failed[0].number) / "error.txt").read_text()
    )


@pytest.mark.slow  # two fresh worker processes import torch and Lightning: about a minute
def test_parallel_joblib_trials_share_one_study(tmp_path):
    name = "parallel"
    run_cli(
        "train.py",
        "-m",
        *TINY_SWEEP,
        f"hydra.sweeper.study_name={name}",
        "launcher=joblib",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        cwd=tmp_path,
    )
    study = load(tmp_path, name)
    assert states(study) == {"COMPLETE": 2}
    # both trials reattached to the study from their worker process: their validation curves
    # (what the pruner judges) are in the shared storage
    for t in study.trials:
        assert sorted(t.intermediate_values) == [1, 2, 3, 4]
    for t in study.trials:
        run = study_dir(tmp_path, name) / str(t.number)
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["val/loss"] == pytest.approx(t.value)
    cfg = OmegaConf.load(study_dir(tmp_path, name) / "0" / ".hydra" / "hydra.yaml")
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")


@pytest.mark.slow  # several training processes: CI runs it after the fast suite
def test_a_nan_trial_is_recorded_failed_and_the_sweep_goes_on(tmp_path):
    name = "nan"
    proc = run_cli(
        "train.py",
        "-m",
        *TINY_SWEEP,
        f"hydra.sweeper.study_name={name}",
        "hydra.sweeper.n_trials=3",
        "hydra/sweeper/pruner=none",
        # seed 0 draws 1e9, 0.01, 1e9: a learning rate of 1e9 turns the weights and loss to NaN
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=0",
        "optimizer.lr=choice(0.01,1e9)",
        # the loss guard off, so that the NaN reaches the objective (the guard's own stop, which
        # fails such a trial earlier, is tested in test_loss_guard.py)
        "callbacks.loss_guard=null",
        cwd=tmp_path,
    )
    study = load(tmp_path, name)
    # a NaN trial counts against n_trials: it is not owed again
    assert [t.number for t in study.trials] == [0, 1, 2]
    nan = [t for t in study.trials if t.params["optimizer.lr"] == 1e9]
    assert nan and nan[0].number == 0, [t.params for t in study.trials]
    for t in nan:
        assert t.state == TrialState.FAIL
        assert t.user_attrs["error"] == "the objective is nan (val/loss)"
        val_loss = json.loads(
            (study_dir(tmp_path, name) / str(t.number) / "metrics.json").read_text()
        )
        assert math.isnan(val_loss["val/loss"])
    # the sweep went on after the NaN trial, and the good trials completed
    good = [t for t in study.trials if t.params["optimizer.lr"] == 0.01]
    assert good and all(t.state == TrialState.COMPLETE and math.isfinite(t.value) for t in good)
    assert "FAIL the objective is nan" in proc.stdout + proc.stderr
    with (study_dir(tmp_path, name) / "trials.csv").open() as f:
        rows = {int(r["number"]): r for r in csv.DictReader(f)}
    assert all(rows[t.number]["error"] == "the objective is nan (val/loss)" for t in nan)


def _running_trial_with_steps(root: Path, name: str, number: int, min_steps: int) -> bool:
    """Trial `number` is RUNNING in the study and has logged at least `min_steps` train steps."""
    db = study_dir(root, name) / "optuna.db"
    metrics = study_dir(root, name) / str(number) / "csv" / "metrics.csv"
    if not (db.exists() and metrics.exists()):
        return False
    trials = load(root, name).get_trials(deepcopy=False)
    if len(trials) <= number or trials[number].state != TrialState.RUNNING:
        return False
    return metrics.read_text().count("\n") > min_steps  # a header, then one row per step


@pytest.mark.slow  # several training processes: CI runs it after the fast suite
def test_sweep_killed_mid_trial_resumes_without_counting_twice(tmp_path):
    """SIGKILL (no chance to clean up) while trial 1 trains; the re-run finishes the study."""
    name = "killed"
    max_steps = 400  # a trial trains for a few seconds: long enough to be caught mid-run
    args = [
        "-m",
        *[a for a in TINY_SWEEP if not a.startswith(("trainer.max_steps", "trainer.val_check"))],
        f"trainer.max_steps={max_steps}",
        "trainer.val_check_interval=100",
        "trainer.log_every_n_steps=1",
        "+logger.csv.flush_logs_every_n_steps=1",
        f"hydra.sweeper.study_name={name}",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.heartbeat_interval=1",
        "hydra.sweeper.grace_period=3",
        "hydra/sweeper/pruner=none",
    ]
    env = {**os.environ, "BIGMODEL_ROOT": str(tmp_path)}
    with (tmp_path / "killed.log").open("w") as out:
        # a session of its own: the kill takes the whole process group, as a scheduler's would
        proc = forkserver.popen(
            [sys.executable, str(ROOT / "train.py"), *args],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if _running_trial_with_steps(tmp_path, name, number=1, min_steps=3):
                    break
                time.sleep(0.2)
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # in flight at the kill: RUNNING in the study, steps logged, never finished
    study = load(tmp_path, name)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    trial_dir = study_dir(tmp_path, name) / "1"
    assert (trial_dir / "train.log").is_file()
    with (trial_dir / "csv" / "metrics.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(steps) >= 3 and steps[-1] < max_steps - 1, steps
    assert not (trial_dir / "metrics.json").exists()

    time.sleep(4)  # past the grace period: the killed trial's heartbeat is now stale
    proc = run_cli("train.py", *args, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert "trial 1 was cut off by an earlier, killed sweep; owed again" in log
    assert "1 of 3 trials done; running 2" in log
    study = load(tmp_path, name)
    # the killed trial is FAIL without an error of its own (not counted); trial 0 is not re-run
    assert [t.state for t in study.trials] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.COMPLETE,
    ]
    assert "error" not in study.trials[1].user_attrs
    assert states(study) == {"COMPLETE": 3, "FAIL": 1}
    with (study_dir(tmp_path, name) / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["interrupted"] for r in rows] == ["", "True", "", ""]
