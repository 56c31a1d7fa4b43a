"""A synthetic regression problem generated from a seed: x -> teacher(x) + noise.

The teacher is a random one-hidden-layer ReLU network, so an MLP of the same shape can reach the
noise floor: the best achievable test MSE is `noise ** 2` (targets are scaled to unit variance
before the noise is added).
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from bigmodel.data.base import DataModule
from bigmodel.errors import UserError


def make_regression(
    n_samples: int, in_features: int, out_features: int, hidden: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (N, in), y (N, out)) with y = standardised teacher(x) + N(0, noise^2)."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(in_features, hidden, generator=g) / in_features**0.5
    b1 = torch.randn(hidden, generator=g) * 0.5
    w2 = torch.randn(hidden, out_features, generator=g) / hidden**0.5
    x = torch.randn(n_samples, in_features, generator=g)  # (N, in)
    y = torch.relu(x @ w1 + b1) @ w2  # (N, out)
    y = (y - y.mean(0)) / y.std(0).clamp_min(1e-6)
    return x, y + noise * torch.randn(y.shape, generator=g)


class RegressionDataModule(DataModule):
    """Seeded synthetic regression data split into train / val / test by fractions."""

    learning = "regression"
    summary = "regression data (feature vectors to targets)"
    provides = ("in_features", "out_features")

    def __init__(
        self,
        n_samples: int = 4000,
        in_features: int = 10,
        out_features: int = 10,
        teacher_hidden: int = 20,
        noise: float = 0.1,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 1337,
        split: str = "test",
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, split=split)
        if min(n_samples, in_features, out_features, teacher_hidden) <= 0:
            raise UserError("data.n_samples, in_features, out_features, teacher_hidden must be > 0")
        if noise < 0:
            raise UserError(f"data.noise must be >= 0, got {noise}")
        n_val, n_test = int(n_samples * val_fraction), int(n_samples * test_fraction)
        if (
            not (val_fraction >= 0 and test_fraction >= 0)
            or n_val < 1
            or n_samples - n_val - n_test < 1
        ):
            raise UserError(
                f"data.val_fraction={val_fraction}, test_fraction={test_fraction} leave no "
                f"train or val samples out of n_samples={n_samples}; change them"
            )
        self.n_samples, self.in_features, self.out_features = n_samples, in_features, out_features
        self.teacher_hidden, self.noise = teacher_hidden, noise
        self.n_val, self.n_test = n_val, n_test
        self.data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def build(self) -> None:
        x, y = make_regression(
            self.n_samples,
            self.in_features,
            self.out_features,
            self.teacher_hidden,
            self.noise,
            self.seed,
        )
        a, b = self.n_samples - self.n_val - self.n_test, self.n_samples - self.n_test
        self.data = {"train": (x[:a], y[:a]), "val": (x[a:b], y[a:b]), "test": (x[b:], y[b:])}

    @property
    def noise_floor(self) -> float:
        """The expected MSE of a perfect predictor: the variance of the added noise."""
        return self.noise**2

    @property
    def net_kwargs(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features}

    def dataset(self, split: str) -> TensorDataset:
        return TensorDataset(*self.data[split])
