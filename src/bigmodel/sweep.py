"""Optuna sweeps that survive failure: a persistent study, resume, failed trials, pruning.

`python train.py -m hparams_search=gpt_optuna` selects the `bigmodel_optuna` Hydra sweeper
(src/hydra_plugins/bigmodel_optuna_sweeper), which drives `OptunaSweep` below:

- the study lives in storage (SQLite `optuna.db` in the sweep directory unless
  `hydra.sweeper.storage` names an Optuna URL), so re-running the same command resumes it and runs
  only the trials still owed;
- a trial that raises or returns NaN is recorded FAIL (with its error) and the sweep goes on;
- each trial gets a `callbacks.optuna_pruning` callback that reattaches to its trial in storage by
  number, reports the monitored metric after each validation and raises `optuna.TrialPruned` when
  the pruner says so; this works in any process the launcher runs the trial in;
- trials of an invocation that was killed are recognised (heartbeats) and neither counted nor
  left RUNNING;
- after every batch the sweep directory holds `optimization_results.yaml` (best value, parameters,
  the command that reproduces the best run) and `trials.csv`; at the end, plots.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import shlex
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.utils import JobReturn, JobStatus
from lightning.pytorch import Callback, LightningModule, Trainer
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from bigmodel.errors import UserError

log = logging.getLogger("bigmodel")

DB_NAME = "optuna.db"
# user attribute of a trial that failed of its own making (raised, NaN): it counts against
# n_trials. A FAIL without it was cut off by an interrupted or killed sweep: it is owed again.
ERROR = "error"
# study user attribute: the task overrides the study was started with
OVERRIDES = "overrides"
# user attribute of a trial: the training step (optimizer steps) of its last report
GLOBAL_STEP = "global_step"


# ---------------------------------------------------------------------------- search space
def _categorical(values: Sequence[Any]) -> CategoricalDistribution:
    # Optuna stores numbers, strings, booleans and None; anything else (lists, dicts) is kept as
    # its override text, which Hydra parses back unchanged.
    kept = [
        v if v is None or isinstance(v, (bool, int, float)) else Transformer.encode(v)
        for v in values
    ]
    return CategoricalDistribution(kept)


def distribution(override: Override) -> BaseDistribution:
    """An Optuna distribution from Hydra sweep syntax.

    `a,b,c` / `choice(a,b,c)` -> categorical; `range(1,9,2)` -> int (or stepped float);
    `interval(1e-4,1e-2)` -> float, `tag(log,interval(...))` -> log-uniform, int bounds -> int.
    """
    value = override.value()
    log_scale = "log" in getattr(value, "tags", set())
    if override.is_choice_sweep():
        return _categorical(list(override.sweep_iterator(transformer=Transformer.identity)))
    if isinstance(value, RangeSweep):
        if value.shuffle or log_scale:
            return _categorical(list(override.sweep_iterator(transformer=Transformer.identity)))
        values = list(value.range())
        if not values:
            raise UserError(
                f"{override.input_line} is an empty range; give range(start, stop, step)"
            )
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return FloatDistribution(values[0], values[-1], step=float(value.step))
    if isinstance(value, IntervalSweep):
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise UserError(
        f"{override.input_line} is not a search space; use choice(a,b), range(a,b,step), "
        "interval(a,b) or tag(log,interval(a,b))"
    )


def search_space(params: dict[str, Any] | None, arguments: Sequence[str]):
    """-> (distributions by override key, fixed task overrides).

    `hydra.sweeper.params` and sweep syntax on the command line both join the search space
    (the command line wins); every other argument is fixed for all trials.
    """
    parser = OverridesParser.create()
    lines = [f"{k}={v}" for k, v in (params or {}).items()]
    space = {o.get_key_element(): distribution(o) for o in parser.parse_overrides(lines)}
    fixed = []
    for o in parser.parse_overrides(list(arguments)):
        if o.is_sweep_override():
            space[o.get_key_element()] = distribution(o)
        else:  # a plain value fixes a key, taking it out of the search
            space.pop(o.get_key_element(), None)
            fixed.append(o.input_line)
    return space, fixed


def format_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def trial_overrides(params: dict[str, Any]) -> list[str]:
    return [f"{k}={format_value(v)}" for k, v in params.items()]


# --------------------------------------------------------------------------------- storage
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


def make_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None):
    engine_kwargs = None
    if url.startswith("sqlite"):
        # parallel trials write intermediate values at the same moment: wait for the lock
        engine_kwargs = {"connect_args": {"timeout": 60}}
    with experimental_ok():  # heartbeat_interval, grace_period
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
        )


def interrupted(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and ERROR not in trial.user_attrs


def counted(trial: FrozenTrial) -> bool:
    """Trials that use up the budget: finished ones, and failures of the trial's own making."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and ERROR in trial.user_attrs


@contextlib.contextmanager
def heartbeats(storage, trial_ids: list[int], interval: int | None) -> Iterator[None]:
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


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a scheduler's time limit, `kill`) interrupts the sweep as Ctrl-C does, so its
    running trials are recorded as interrupted and owed again rather than left RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------- sweep
@dataclass
class SweepSettings:
    """`hydra.sweeper.*` (see hydra_plugins/bigmodel_optuna_sweeper/config.py); the sampler and
    pruner are built from the config by the sweep (and by each trial, for the pruner)."""

    direction: str
    storage: str | None
    study_name: str | None
    n_trials: int
    n_jobs: int
    max_trials_per_run: int | None
    params: dict[str, Any] | None
    heartbeat_interval: int | None
    grace_period: int | None
    plots: bool


class OptunaSweep:
    """One invocation of a (possibly resumed) study: ask a batch, launch it, tell, repeat."""

    def __init__(self, settings: SweepSettings, config: DictConfig, launcher) -> None:
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
        self.storage = make_storage(self.url, self.s.heartbeat_interval, self.s.grace_period)
        study = optuna.create_study(
            study_name=self.study_name,
            storage=self.storage,
            direction=self.s.direction,
            pruner=hydra.utils.instantiate(self.config.hydra.sweeper.pruner),
            load_if_exists=True,
        )
        # A seeded sampler restarted as it was would propose the first points again: a resumed
        # study draws from seed + number of trials so far (still reproducible).
        sampler_conf = self.config.hydra.sweeper.sampler
        seed = sampler_conf.get("seed")
        resumed = len(study.get_trials(deepcopy=False))
        if seed is not None and resumed:
            sampler_conf = OmegaConf.merge(sampler_conf, {"seed": seed + resumed})
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
            self.storage.record_heartbeat(trial._trial_id)
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

    def interrupt(self, study: optuna.Study, batch: list[optuna.Trial]) -> None:
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
            while True:
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
                batch = [self.ask(study, space) for _ in range(min(self.s.n_jobs, owed))]
                overrides = [
                    [*fixed, *trial_overrides(t.params), *self.pruning_overrides(t.number)]
                    for t in batch
                ]
                try:
                    with heartbeats(
                        self.storage, [t._trial_id for t in batch], self.s.heartbeat_interval
                    ):
                        returns: Sequence[Any] = self.launcher.launch(
                            overrides, initial_job_idx=batch[0].number
                        )
                except (KeyboardInterrupt, SystemExit):
                    self.interrupt(study, batch)
                    self.write_summary(study, fixed)
                    raise
                except Exception as e:  # the launcher itself failed (a worker died, ...)
                    returns = [e] * len(batch)
                for trial, ret in zip(batch, returns, strict=True):
                    outcome = self.record(study, trial, ret)
                    log.info(f"trial {trial.number} {trial.params}: {outcome}")
                ran += len(batch)
                self.write_summary(study, fixed)
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


def write_trials_csv(trials: list[FrozenTrial], path: Path) -> None:
    """One row per trial: number, state, value, parameters, error, progress, times.

    Progress: `last_validation`, the step of the trial's last report to the pruner (its
    validation count, see OptunaPruning), and `global_step`, the training step it was made at.
    """
    names = sorted({k for t in trials for k in t.params})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "number",
                "state",
                "value",
                *names,
                "error",
                "interrupted",
                "last_validation",
                GLOBAL_STEP,
                "datetime_start",
                "datetime_complete",
                "duration_s",
            ]
        )
        for t in trials:
            duration = (
                (t.datetime_complete - t.datetime_start).total_seconds()
                if (t.datetime_complete and t.datetime_start)
                else ""
            )
            w.writerow(
                [
                    t.number,
                    t.state.name,
                    "" if t.value is None else t.value,
                    *[t.params.get(n, "") for n in names],
                    t.user_attrs.get(ERROR, ""),
                    interrupted(t) or "",
                    t.last_step if t.last_step is not None else "",
                    t.user_attrs.get(GLOBAL_STEP, ""),
                    t.datetime_start or "",
                    t.datetime_complete or "",
                    duration,
                ]
            )


def write_plots(study: optuna.Study, out: Path) -> list[Path]:
    """Optimisation history, parameter importances, parallel coordinates, learning curves (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    out.mkdir(parents=True, exist_ok=True)
    written = []
    plots = {
        "optimization_history": ov.plot_optimization_history,
        "param_importances": ov.plot_param_importances,
        "parallel_coordinate": ov.plot_parallel_coordinate,
        "intermediate_values": ov.plot_intermediate_values,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the matplotlib backend is marked experimental
        for name, plot in plots.items():
            try:
                ax = plot(study)
                first = ax.flat[0] if hasattr(ax, "flat") else ax
                if name == "intermediate_values":  # Optuna labels the report step "Step"
                    first.set_xlabel("Validation")
                fig = first.get_figure()
                fig.set_size_inches(10, 6)
                fig.tight_layout()
                fig.savefig(out / f"{name}.png", dpi=100)
                plt.close(fig)
                written.append(out / f"{name}.png")
            except Exception as e:  # e.g. importances need two finished trials
                log.info(f"no {name} plot: {type(e).__name__}: {e}")
    return written


# --------------------------------------------------------------------------------- pruning
class OptunaPruning(Callback):
    """Report `monitor` after each validation to the sweep's trial; stop it when pruned.

    The sweeper adds this callback to every trial (`callbacks.optuna_pruning.trial_number=N`); the
    trial process reattaches to the study in storage by number, so pruning works whichever process
    or machine the launcher runs the trial on. The step reported is the validation count (1, 2, ..),
    so trials with different batch sizes are compared at the same point of their schedule: Optuna's
    pruners compare trials at equal steps only, and a trial with twice the batch size validates at
    half the training steps. The training step of the last report is kept as the trial's
    `global_step` user attribute (trials.csv shows both).
    Storage, study and pruner come from the sweep's Hydra config unless given.
    """

    def __init__(
        self,
        trial_number: int | None = None,
        monitor: str = "val/loss",
        storage: str | None = None,
        study_name: str | None = None,
    ) -> None:
        self.trial_number, self.monitor = trial_number, monitor
        self.storage, self.study_name = storage, study_name
        self.trial: optuna.Trial | None = None
        self.validations = 0

    def _attach(self) -> optuna.Trial:
        from hydra.core.hydra_config import HydraConfig

        pruner = None
        storage, study_name = self.storage, self.study_name
        if HydraConfig.initialized():
            hc = HydraConfig.get()
            sweeper = hc.sweeper
            if "n_trials" in sweeper:  # our sweeper's config
                storage = storage or storage_url(sweeper.get("storage"), hc.sweep.dir)
                study_name = study_name or sweeper.get("study_name") or Path(hc.sweep.dir).name
                if sweeper.get("pruner"):
                    pruner = hydra.utils.instantiate(sweeper.pruner)
        if not storage or not study_name:
            raise UserError(
                "callbacks.optuna_pruning needs an Optuna sweep (python train.py -m "
                "hparams_search=...) or explicit storage and study_name"
            )
        study = optuna.load_study(
            study_name=study_name, storage=make_storage(storage), pruner=pruner
        )
        tid = study._storage.get_trial_id_from_study_id_trial_number(
            study._study_id, self.trial_number
        )
        return optuna.Trial(study, tid)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.trial_number is not None and trainer.is_global_zero:
            self.trial = self._attach()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.trial_number is None or trainer.sanity_checking:
            return
        self.validations += 1
        prune = False
        if self.trial is not None:
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                raise UserError(
                    f"callbacks.optuna_pruning.monitor={self.monitor} was not logged at "
                    f"validation; logged: {', '.join(sorted(trainer.callback_metrics))}"
                )
            self.trial.report(float(value), self.validations)
            self.trial.set_user_attr(GLOBAL_STEP, trainer.global_step)
            prune = self.trial.should_prune()
        prune = trainer.strategy.broadcast(prune)  # every rank stops together
        if prune:
            raise optuna.TrialPruned(
                f"trial {self.trial_number} pruned at validation {self.validations} "
                f"(step {trainer.global_step})"
            )
