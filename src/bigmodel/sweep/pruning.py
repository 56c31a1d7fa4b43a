"""The Lightning callback that reports a sweep trial's validations to its study and prunes it.

The sweeper adds it to every trial's job (`callbacks.optuna_pruning`); it runs in the trial's
own process, wherever the launcher put it, and reaches the trial through the study's storage.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import optuna
from lightning.pytorch import Callback, LightningModule, Trainer

from bigmodel.errors import UserError
from bigmodel.sweep.storage import GLOBAL_STEP, make_storage, storage_url, trial_id


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
        url, study_name = self.storage, self.study_name
        if HydraConfig.initialized():
            hc = HydraConfig.get()
            sweeper = hc.sweeper
            if "n_trials" in sweeper:  # our sweeper's config
                url = url or storage_url(sweeper.get("storage"), hc.sweep.dir)
                study_name = study_name or sweeper.get("study_name") or Path(hc.sweep.dir).name
                if sweeper.get("pruner"):
                    pruner = hydra.utils.instantiate(sweeper.pruner)
        if not url or not study_name:
            raise UserError(
                "callbacks.optuna_pruning needs an Optuna sweep (python train.py -m "
                "hparams_search=...) or explicit storage and study_name"
            )
        storage = make_storage(url)
        study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
        return optuna.Trial(study, trial_id(storage, study_name, self.trial_number))

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
