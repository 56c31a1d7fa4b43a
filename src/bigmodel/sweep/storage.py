"""Where a study lives and what it keeps: storage URL, RDB storage, heartbeats, which trials count.

The study is kept in an Optuna RDB storage (SQLite `optuna.db` in the sweep directory unless an
Optuna URL is configured), so any process can reach it: the sweep, a resumed sweep, each trial's
pruning callback. Running trials send heartbeats, so that a later sweep can tell the trials of a
killed one: those are FAIL without an error of their own, not counted, and owed again.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

DB_NAME = "optuna.db"
# user attribute of a trial that failed of its own making (raised, NaN): it counts against
# n_trials. A FAIL without it was cut off by an interrupted or killed sweep: it is owed again.
ERROR = "error"
# user attribute of a trial: the training step (optimizer steps) of its last report
GLOBAL_STEP = "global_step"


def storage_url(storage: str | None, sweep_dir: str | os.PathLike) -> str:
    """The study's storage: the configured Optuna URL, else SQLite in the sweep directory."""
    if storage:
        return str(storage)
    return f"sqlite:///{Path(sweep_dir).resolve() / DB_NAME}"


@contextlib.contextmanager
def experimental_ok() -> Iterator[None]:
    """Optuna marks the heartbeat features we use experimental and warns on each use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        yield


def make_storage(
    url: str, heartbeat_interval: int | None = None, grace_period: int | None = None
) -> RDBStorage:
    engine_kwargs = None
    if url.startswith("sqlite"):
        # parallel trials write intermediate values at the same moment: wait for the lock
        engine_kwargs = {"connect_args": {"timeout": 60}}
    with experimental_ok():  # heartbeat_interval, grace_period
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
        )


def trial_id(storage: RDBStorage, study_name: str, number: int) -> int:
    """The storage's id of trial `number` of the study (what its heartbeat is recorded by)."""
    study_id = storage.get_study_id_from_name(study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


def interrupted(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and ERROR not in trial.user_attrs


def counted(trial: FrozenTrial) -> bool:
    """Trials that use up the budget: finished ones, and failures of the trial's own making."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and ERROR in trial.user_attrs


@contextlib.contextmanager
def heartbeats(storage: RDBStorage, trial_ids: list[int], interval: int | None) -> Iterator[None]:
    """Mark trials alive while they run, so a later sweep can tell a killed sweep's trials."""
    if not interval or not trial_ids:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            for tid in trial_ids:
                with contextlib.suppress(Exception):  # a missed beat only delays nothing
                    storage.record_heartbeat(tid)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
