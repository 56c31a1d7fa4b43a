"""Optuna sweeps that survive failure: a persistent study, resume, failed trials, pruning.

`python train.py -m hparams_search=gpt_optuna` selects the `bigmodel_optuna` Hydra sweeper
(src/hydra_plugins/bigmodel_optuna_sweeper), which drives `OptunaSweep` (study.py) with its own
config dataclass: the study lives in storage (storage.py), so re-running the same command resumes
it and runs only the trials still owed; the search space comes from `hydra.sweeper.params` and
the command line (space.py); a trial that raises or returns NaN is recorded FAIL with its error and
the sweep goes on; each trial's `callbacks.optuna_pruning` (pruning.py) reports its validations
and stops it when the pruner says so; trials of a killed invocation are recognised by their
heartbeats and owed again; `optimization_results.yaml`, `trials.csv` and plots (report.py) sum
it up.
"""

from bigmodel.sweep.pruning import OptunaPruning
from bigmodel.sweep.space import search_space, trial_overrides
from bigmodel.sweep.study import OptunaSweep

__all__ = ["OptunaPruning", "OptunaSweep", "search_space", "trial_overrides"]
