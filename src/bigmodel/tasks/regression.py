"""Regression: inputs -> (B, D) predictions, trained with MSE (or L1 / Huber via `loss=`).

Metrics (torchmetrics): `*/mse`, `*/mae`, `*/r2` (R2 averaged uniformly over outputs, as
scikit-learn's r2_score).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, R2Score

from bigmodel.tasks.base import Task
from bigmodel.tasks.protocols import RegressionNet


def regression_metrics() -> MetricCollection:
    return MetricCollection(
        {
            "mse": MeanSquaredError(),
            "mae": MeanAbsoluteError(),
            "r2": R2Score(multioutput="uniform_average"),
        },
        compute_groups=False,  # groups are guessed from equal states; not worth the risk
    )


class Regressor(Task):
    """Args:
    loss: a module mapping (predictions, targets) to a scalar; MSE by default.
    """

    learning = "regression"
    losses = (nn.MSELoss, nn.L1Loss, nn.HuberLoss, nn.SmoothL1Loss)

    def __init__(
        self,
        net: RegressionNet,
        optimizer: functools.partial | None = None,
        scheduler: dict | None = None,
        compile: bool = False,
        loss: nn.Module | None = None,
    ) -> None:
        super().__init__(net, optimizer, scheduler, compile)
        self.loss_fn = loss if loss is not None else nn.MSELoss()
        self.val_metrics = regression_metrics().clone(prefix="val/")
        self.test_metrics = regression_metrics().clone(prefix="test/")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch  # (B, D_in), (B, D_out)
        pred = self.net(x).float().view_as(y)  # (B, D_out)
        return self.loss_fn(pred, y), pred, y

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._step(batch)
        self.log_metric("train/loss", loss, batch, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, pred, y = self._step(batch)
        self.val_metrics.update(pred, y)
        self.log_metric("val/loss", loss, batch, prog_bar=True)
        self.log_dict(self.val_metrics, on_epoch=True)

    def test_step(self, batch, batch_idx: int) -> None:
        loss, pred, y = self._step(batch)
        self.test_metrics.update(pred, y)
        self.log_metric("test/loss", loss, batch)
        self.log_dict(self.test_metrics, on_epoch=True)
