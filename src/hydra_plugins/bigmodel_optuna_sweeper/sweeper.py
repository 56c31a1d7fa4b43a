"""The Hydra Sweeper plugin; the work is done by bigmodel.sweep.OptunaSweep."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from .config import BigmodelOptunaSweeperConf


class BigmodelOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        # hydra.sweeper as plain values (see BigmodelOptunaSweeperConf: _recursive_, _convert_)
        self.settings = settings

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        # imported here: Hydra imports every plugin module on start, and Optuna takes a while
        from bigmodel.sweep import OptunaSweep

        sweep = OptunaSweep(BigmodelOptunaSweeperConf(**self.settings), self.config, self.launcher)
        return sweep.run(list(arguments))
