"""What a sweep leaves to read: `trials.csv` (one row per trial) and PNG plots of the study.

The sweep rewrites `trials.csv` after every batch of trials, so it is current even when the sweep
is cut off; the plots (optimisation history, parameter importances, parallel coordinates,
learning curves) are drawn once at the end with Optuna's matplotlib backend.
"""

from __future__ import annotations

import csv
import logging
import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

from bigmodel.sweep.storage import ERROR, GLOBAL_STEP, interrupted

log = logging.getLogger("bigmodel")


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
