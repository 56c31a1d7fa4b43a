"""One invocation of a (possibly resumed) Optuna study: ask a batch, launch it, tell, repeat.

`OptunaSweep` creates or resumes the study in storage, checks that a resumed study keeps its
direction and fixed overrides, reseeds the sampler, recognises the trials of a killed sweep, and
runs only the trials still owed, in batches of `n_jobs` through Hydra's launcher. Each trial's
outcome (value, pruned, failed with its error) is told to the study; SIGTERM or Ctrl-C records
the running batch as interrupted. After every batch it writes `optimization_results.yaml` and
`trials.csv`; at the end, the plots.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shlex
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import optuna
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState

from bigmodel.callbacks.sigterm import training
from bigmodel.errors import Stopped, UserError
from bigmodel.sweep.report import write_plots, write_trials_csv
from bigmodel.sweep.space import search_space, trial_overrides
from bigmodel.sweep.storage import (
    ERROR,
    counted,
    experimental_ok,
    heartbeats,
    make_storage,
    storage_url,
    trial_id,
)

if TYPE_CHECKING:
    from hydra_plugins.bigmodel_optuna_sweeper.config import BigmodelOptunaSweeperConf

log = logging.getLogger("bigmodel")

# study user attribute: the task overrides the study was started with
OVERRIDES = "overrides"


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a scheduler's time limit, `kill`) interrupts the sweep as Ctrl-C does, so its
    running trials are recorded as interrupted and owed again rather than left RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        if training():  # a trial trains: it saves, stops, and the sweep stops after it
            return
        raise Stopped(signum, f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def held_signals():
    """SIGINT and SIGTERM arriving inside the block are delivered when it ends."""
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class OptunaSweep:
    """One invocation of a (possibly resumed) study: ask a batch, launch it, tell, repeat.

    `settings` is `hydra.sweeper` (the plugin's config dataclass), its sampler and pruner plain
    configs with a `_target_`: the sweep builds them (a resumed study reseeds its sampler).
    """

    def __init__(
        self, settings: BigmodelOptunaSweeperConf, config: DictConfig, launcher: Any
    ) -> None:
        self.s, self.config, self.launcher = settings, config, launcher
        # Optuna's own lines ("A new study created ...") through Hydra's logging, as ours are,
        # rather than through the stderr handler Optuna installs for itself
        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.study_name = settings.study_name or self.sweep_dir.name
        self.url = storage_url(settings.storage, self.sweep_dir)
        self.monitor = config.get("optimized_metric")

    # ------------------------------------------------------------------ study
    def load_study(self, fixed: list[str]) -> optuna.Study:
        if self.s.direction not in ("minimize", "maximize"):
            raise UserError(
                f"hydra.sweeper.direction={self.s.direction} is not valid; use minimize or maximize"
            )
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        # kept: heartbeats and trial ids go through this storage
        self.storage = make_storage(self.url, self.s.heartbeat_interval, self.s.grace_period)
        study = optuna.create_study(
            study_name=self.study_name,
            storage=self.storage,
            direction=self.s.direction,
            pruner=hydra.utils.instantiate(self.s.pruner),
            load_if_exists=True,
        )
        # A seeded sampler restarted as it was would propose the first points again: a resumed
        # study draws from seed + number of trials so far (still reproducible).
        sampler_conf = dict(self.s.sampler)
        seed = sampler_conf.get("seed")
        resumed = len(study.get_trials(deepcopy=False))
        if seed is not None and resumed:
            sampler_conf["seed"] = seed + resumed
        study.sampler = hydra.utils.instantiate(sampler_conf)
        if study.direction.name.lower() != self.s.direction:
            raise UserError(
                f"study {self.study_name} was created to {study.direction.name.lower()}, not "
                f"{self.s.direction}; keep the direction or set hydra.sweeper.study_name=<new name>"
            )
        # A resumed study must keep its fixed overrides, or its trials would not be comparable.
        before = study.user_attrs.get(OVERRIDES)
        if before is None:
            study.set_user_attr(OVERRIDES, fixed)
        elif sorted(before) != sorted(fixed):
            raise UserError(
                f"study {self.study_name} in {self.url_for_humans} was started with "
                f"{' '.join(before) or 'no overrides'}, this command has "
                f"{' '.join(fixed) or 'none'}; re-run the original command to resume it, or set "
                "hydra.sweeper.study_name=<new name> to start another study"
            )
        return study

    @property
    def url_for_humans(self) -> str:
        # an Optuna URL may hold a database password: show only its scheme and location
        head, sep, tail = self.url.rpartition("@")
        return f"{self.url.split(':', 1)[0]}://...@{tail}" if sep else self.url

    def fail_stale(self, study: optuna.Study) -> None:
        """Trials left RUNNING by a killed sweep: record them FAIL, interrupted (not counted)."""
        if not self.s.heartbeat_interval:
            return
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        with experimental_ok():
            optuna.storages.fail_stale_trials(study)
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            if t.number in before:
                log.warning(f"trial {t.number} was cut off by an earlier, killed sweep; owed again")

    # ------------------------------------------------------------------ trials
    def ask(self, study: optuna.Study, space: dict[str, BaseDistribution]) -> optuna.Trial:
        trial = study.ask(space)
        if self.s.heartbeat_interval:
            # at once: a trial with no heartbeat at all would never be recognised as stale
            self.storage.record_heartbeat(trial_id(self.storage, self.study_name, trial.number))
        return trial

    def pruning_overrides(self, number: int) -> list[str]:
        cb = "++callbacks.optuna_pruning"
        out = [f"{cb}._target_=bigmodel.sweep.OptunaPruning", f"{cb}.trial_number={number}"]
        if self.monitor:
            out.append(f"{cb}.monitor={self.monitor}")
        return out

    def record(
        self, study: optuna.Study, trial: optuna.Trial, ret: JobReturn | BaseException
    ) -> str:
        """Tell the study how a trial ended; return its state name."""
        if isinstance(ret, BaseException):
            error: BaseException | None = ret
        else:
            # the field itself: JobReturn.return_value re-raises a failed job's error
            error = ret._return_value if ret.status == JobStatus.FAILED else None
        if isinstance(error, optuna.TrialPruned):
            study.tell(trial, state=TrialState.PRUNED)
            return "PRUNED"
        if error is None:
            value = ret.return_value
            value = float(value) if isinstance(value, (int, float)) else None
            if value is not None and math.isfinite(value):
                study.tell(trial, value)
                return f"COMPLETE {self.monitor}={value:.6g}"
            message = f"the objective is {value} ({self.monitor})"
        else:
            message = f"{type(error).__name__}: {str(error).strip()}"[:1000]
            self._write_traceback(ret, error)
        trial.set_user_attr(ERROR, message)
        study.tell(trial, state=TrialState.FAIL)
        return f"FAIL {message.splitlines()[0][:200]}"

    def _write_traceback(self, ret: Any, error: BaseException) -> None:
        out = getattr(getattr(getattr(ret, "hydra_cfg", None), "hydra", None), "runtime", None)
        out_dir = getattr(out, "output_dir", None)
        if out_dir and Path(out_dir).is_dir():
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            (Path(out_dir) / "error.txt").write_text(text)

    def launch(self, batch: list[optuna.Trial], fixed: list[str]) -> Sequence[Any]:
        """Run a batch of trials through the launcher; a failed launch fails each of them."""
        overrides = [
            [*fixed, *trial_overrides(t.params), *self.pruning_overrides(t.number)] for t in batch
        ]
        try:
            ids = [trial_id(self.storage, self.study_name, t.number) for t in batch]
            with heartbeats(self.storage, ids, self.s.heartbeat_interval):
                return self.launcher.launch(overrides, initial_job_idx=batch[0].number)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # the launcher itself failed (a worker died, ...)
            return [e] * len(batch)

    def interrupt(self, study: optuna.Study, batch: list[optuna.Trial]) -> None:
        """Record the trials of `batch` cut off by a signal as failed (owed again)."""
        for trial in batch:
            with contextlib.suppress(Exception):
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)

    # ------------------------------------------------------------------ loop
    def run(self, arguments: list[str]) -> dict[str, Any] | None:
        space, fixed = search_space(self.s.params, arguments)
        if not space:
            raise UserError(
                "the Optuna sweep has no search space; set hydra.sweeper.params "
                "(e.g. optimizer.lr: tag(log, interval(1e-4, 1e-2))) or pass sweep syntax"
            )
        study = self.load_study(fixed)
        log.info(
            f"Optuna study {self.study_name} ({self.s.direction} {self.monitor}) in "
            f"{self.url_for_humans}; sampler {type(study.sampler).__name__}, "
            f"pruner {type(study.pruner).__name__}; search space: {', '.join(space)}"
        )
        ran = 0
        with warnings.catch_warnings(), sigterm_interrupts():
            # we keep heartbeats ourselves, around ask/tell rather than Study.optimize
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            batch: list[optuna.Trial] = []
            try:
                while True:
                    batch = []
                    self.fail_stale(study)
                    trials = study.get_trials(deepcopy=False)
                    done = sum(counted(t) for t in trials)
                    owed = self.s.n_trials - done
                    if self.s.max_trials_per_run is not None:
                        owed = min(owed, self.s.max_trials_per_run - ran)
                    if ran == 0:
                        log.info(f"{done} of {self.s.n_trials} trials done; running {max(owed, 0)}")
                    if owed <= 0:
                        break
                    for _ in range(min(self.s.n_jobs, owed)):
                        # a signal while Optuna records the new trial would leave it RUNNING
                        # and out of `batch`: it is held until the trial is in the batch
                        with held_signals():
                            batch.append(self.ask(study, space))
                    returns = self.launch(batch, fixed)
                    for trial, ret in zip(batch, returns, strict=True):
                        outcome = self.record(study, trial, ret)
                        log.info(f"trial {trial.number} {trial.params}: {outcome}")
                    ran += len(batch)
                    self.write_summary(study, fixed)
            except KeyboardInterrupt as e:
                # in a trial or between trials: the trials cut off are owed again, the study
                # and trials.csv are saved, and the command ends as a stopped one, not 0
                self.interrupt(study, batch)
                self.write_summary(study, fixed)
                signum = getattr(e, "signum", signal.SIGINT)
                counted_now = sum(counted(t) for t in study.get_trials(deepcopy=False))
                raise Stopped(
                    signum,
                    f"study {self.study_name} saved with {counted_now} of {self.s.n_trials} "
                    f"trials done (trials.csv in {self.sweep_dir}); run the same command to "
                    "resume it",
                ) from None
            except SystemExit:
                self.interrupt(study, batch)
                self.write_summary(study, fixed)
                raise
        self.fail_stale(study)
        best = self.write_summary(study, fixed)
        if best is None:
            log.warning(f"no trial of study {self.study_name} completed; see trials.csv")
            return None
        if self.s.plots and (ran or not (self.sweep_dir / "plots").is_dir()):
            write_plots(study, self.sweep_dir / "plots")
        log.info(
            f"best trial {best['best_trial']}: {self.monitor}={best['best_value']:.6g} "
            f"{best['best_params']}\nreproduce: {best['command']}\nsummary, trials.csv, plots: "
            f"{self.sweep_dir}"
        )
        return best

    # ------------------------------------------------------------------ results
    def write_summary(self, study: optuna.Study, fixed: list[str]) -> dict[str, Any] | None:
        trials = study.get_trials(deepcopy=False)
        write_trials_csv(trials, self.sweep_dir / "trials.csv")
        states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
        summary: dict[str, Any] = {
            "study_name": self.study_name,
            "storage": self.url_for_humans,
            "direction": self.s.direction,
            "metric": self.monitor,
            "n_trials": self.s.n_trials,
            "counted": sum(counted(t) for t in trials),
            "states": {k: v for k, v in states.items() if v},
        }
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if complete:
            best = study.best_trial
            args = [*fixed, *trial_overrides(best.params)]
            script = sys.argv[0] if sys.argv and sys.argv[0] else "train.py"
            summary.update(
                best_trial=best.number,
                best_value=best.value,
                best_params=dict(best.params),
                best_run_dir=str(self.sweep_dir / str(best.number)),
                command=" ".join(["python", shlex.quote(script), *map(shlex.quote, args)]),
            )
        path = self.sweep_dir / "optimization_results.yaml"
        path.write_text(OmegaConf.to_yaml(OmegaConf.create(summary)))
        return summary if complete else None
