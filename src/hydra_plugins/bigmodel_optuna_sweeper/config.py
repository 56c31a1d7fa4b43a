"""`hydra.sweeper` config of the bigmodel Optuna sweeper, and its sampler/pruner options.

The keys follow Hydra's own Optuna sweeper (n_trials, direction, sampler, params, storage,
study_name, n_jobs) so its configs carry over; pruner, max_trials_per_run and the heartbeat
settings are ours. `bigmodel.sweep.OptunaSweep` takes this dataclass as its settings.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = None
    n_startup_trials: int = 10
    multivariate: bool = False
    constant_liar: bool = False  # true: parallel workers avoid sampling the same point


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = None


@dataclass
class CmaEsSamplerConf:
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: int | None = None
    n_startup_trials: int = 1


@dataclass
class QMCSamplerConf:
    _target_: str = "optuna.samplers.QMCSampler"
    seed: int | None = None
    qmc_type: str = "sobol"


@dataclass
class NopPrunerConf:
    # never prunes; trials still report their validation curve to the study
    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class MedianPrunerConf:
    _target_: str = "optuna.pruners.MedianPruner"
    # no pruning until this many trials completed, nor before this many validations of a trial
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class SuccessiveHalvingPrunerConf:
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0


@dataclass
class HyperbandPrunerConf:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"
    reduction_factor: int = 3


@dataclass
class BigmodelOptunaSweeperConf:
    _target_: str = "hydra_plugins.bigmodel_optuna_sweeper.sweeper.BigmodelOptunaSweeper"
    # Hydra hands the sweeper plain values, the sampler and pruner as their configs: the sweep
    # builds them itself (a resumed study reseeds its sampler, each trial builds the pruner)
    _recursive_: bool = False
    _convert_: str = "all"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])

    sampler: Any = MISSING
    pruner: Any = MISSING
    # minimize or maximize the value train.py returns (`optimized_metric`)
    direction: str = "minimize"
    # an Optuna storage URL (sqlite:///..., postgresql://...); null: <sweep dir>/optuna.db
    storage: str | None = None
    # the study to create or resume; null: the sweep directory's name
    study_name: str | None = None
    # the study's total: a re-run runs only the trials still owed
    n_trials: int = 20
    # trials launched at once (run in parallel by a parallel launcher, e.g. launcher=joblib)
    n_jobs: int = 1
    # stop this invocation after this many trials (null: run all that are owed)
    max_trials_per_run: int | None = None
    # the search space: key -> choice(...), range(...), interval(...), tag(log, interval(...))
    params: dict[str, str] | None = None
    # a RUNNING trial with no heartbeat for grace_period seconds belongs to a killed sweep
    heartbeat_interval: int | None = 10
    grace_period: int | None = 60
    # write PNG plots of the study into <sweep dir>/plots at the end
    plots: bool = True


cs = ConfigStore.instance()
cs.store(
    group="hydra/sweeper",
    name="bigmodel_optuna",
    node=BigmodelOptunaSweeperConf,
    provider="bigmodel",
)
for name, node in {
    "tpe": TPESamplerConf,
    "random": RandomSamplerConf,
    "cmaes": CmaEsSamplerConf,
    "qmc": QMCSamplerConf,
}.items():
    cs.store(group="hydra/sweeper/sampler", name=name, node=node, provider="bigmodel")
for name, node in {
    "none": NopPrunerConf,
    "median": MedianPrunerConf,
    "successive_halving": SuccessiveHalvingPrunerConf,
    "hyperband": HyperbandPrunerConf,
}.items():
    cs.store(group="hydra/sweeper/pruner", name=name, node=node, provider="bigmodel")
