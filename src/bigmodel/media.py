"""Figures and text to a run's experiment trackers, whichever they are.

Lightning's loggers share one API for metrics, none for media: TensorBoard, W&B and MLflow each
take figures and text through their own calls. Loggers with none of them (CSV) are skipped; the
callers keep their own copy in the run directory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def log_text(
    loggers: Iterable[Any],
    key: str,
    text: str,
    step: int,
    columns: Sequence[str] = ("step", "text"),
    rows: Sequence[Sequence[Any]] | None = None,
) -> None:
    """`text` to TensorBoard (which renders it as Markdown) and a table to W&B.

    The W&B table has `columns` and `rows`, by default one (step, text) row. MLflow gets no text.
    """
    for logger in loggers:
        exp = getattr(logger, "experiment", None)
        if hasattr(exp, "add_text"):  # TensorBoard
            exp.add_text(key, text, global_step=step)
        elif hasattr(logger, "log_text"):  # W&B
            data = [[step, text]] if rows is None else [list(r) for r in rows]
            logger.log_text(key, columns=list(columns), data=data, step=step)


def log_figure(loggers: Iterable[Any], key: str, figure: Any, png: Path, step: int) -> None:
    """A matplotlib `figure`, already saved as `png`, to W&B, TensorBoard and MLflow.

    W&B and MLflow upload the file, TensorBoard renders the figure; the figure stays open.
    """
    for logger in loggers:
        exp = getattr(logger, "experiment", None)
        if hasattr(logger, "log_image"):  # W&B
            logger.log_image(key, images=[str(png)], step=step)
        elif hasattr(exp, "add_figure"):  # TensorBoard
            exp.add_figure(key, figure, global_step=step, close=False)
        elif hasattr(exp, "log_artifact") and getattr(logger, "run_id", None):  # MLflow
            exp.log_artifact(logger.run_id, str(png))
