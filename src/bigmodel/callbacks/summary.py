"""Lightning's rich model summary, without FLOPs it did not count; once per sweep process."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary import (
    get_formatted_model_size,
    get_human_readable_count,
)

# column name -> rich column options, as Lightning's RichModelSummary styles them
_COLUMNS = {
    " ": {"style": "dim"},
    "Name": {"justify": "left", "no_wrap": True},
    "Params": {"justify": "right"},
    "Params per Device": {"justify": "right"},
    "FLOPs": {"justify": "right"},
    "In sizes": {"justify": "right", "style": "white"},
    "Out sizes": {"justify": "right", "style": "white"},
}


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class ModelSummary(RichModelSummary):
    """RichModelSummary that shows FLOPs only where Lightning counted them, and sizes a
    mixed-precision model without a warning (its weights are fp32).

    Lightning counts FLOPs by running the task's `example_input_array` through it; without one
    (our tasks define none: a forward pass at start-up is not free for a big model) its FLOPs
    column reads 0 for every layer and its total `Total FLOPs: 0`. Here that column and line are
    left out. The FLOPs a run does are in ThroughputMonitor's `train/device/flops_per_sec`.

    first_job_only: in a Hydra multirun (a sweep), print the summary of the first job this
    process runs only (later trials differ in their hyperparameters, and their parameter counts
    are logged anyway).
    """

    _printed_in_multirun = False  # one process runs the jobs of a sweep in turn

    def __init__(self, max_depth: int = 1, first_job_only: bool = False, **summarize_kwargs: Any):
        super().__init__(max_depth=max_depth, **summarize_kwargs)
        self.first_job_only = first_job_only
        self._flops_counted = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.first_job_only and _in_multirun():
            if ModelSummary._printed_in_multirun:
                return
            ModelSummary._printed_in_multirun = True
        self._flops_counted = getattr(pl_module, "example_input_array", None) is not None
        with warnings.catch_warnings():
            # Lightning warns that it sizes a mixed-precision model at 32 bits a parameter: right,
            # since mixed precision keeps the weights in fp32
            if "mixed" in str(trainer.precision):
                warnings.filterwarnings("ignore", message=r"Precision .* model summary")
            super().on_fit_start(trainer, pl_module)

    def summarize(
        self,
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from rich import get_console
        from rich.table import Table

        counted = self._flops_counted and total_flops > 0
        if not counted:
            summary_data = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in summary_data:
            table.add_column(name, **_COLUMNS.get(name, {}))
        for row in zip(*(values for _, values in summary_data), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)

        grid = Table.grid(expand=True)
        grid.add_column()
        for label, value in (
            ("Trainable params", get_human_readable_count(int(trainable_parameters))),
            (
                "Non-trainable params",
                get_human_readable_count(int(total_parameters - trainable_parameters)),
            ),
            ("Total params", get_human_readable_count(int(total_parameters))),
            ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
            ("Modules in train mode", total_training_modes["train"]),
            ("Modules in eval mode", total_training_modes["eval"]),
            *([("Total FLOPs", get_human_readable_count(total_flops))] if counted else []),
        ):
            grid.add_row(f"[bold]{label}[/]: {value}")
        console.print(grid)
