"""A multi-layer perceptron: the introductory regression net, and a baseline for flat inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from bigmodel.nets.layers import build_config

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


@dataclass
class MLPConfig:
    in_features: int
    """Inputs per example (after flattening); filled from the data module when left as `???`."""
    out_features: int
    """Outputs per example; filled from the data module when left as `???`."""
    hidden: list[int] | tuple[int, ...] = (20,)
    """Width of each hidden layer, in order; empty: a linear model."""
    activation: str = "relu"
    """After each hidden Linear: relu, gelu, tanh, silu, sigmoid or identity."""
    dropout: float = 0.0
    """Dropout after each hidden activation (none at 0)."""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"model.net.activation={self.activation} is not one of {', '.join(ACTIVATIONS)}; "
                "choose one of those"
            )
        if self.in_features <= 0 or self.out_features <= 0 or any(h <= 0 for h in self.hidden):
            raise ValueError(
                f"MLP widths must be positive (in {self.in_features}, hidden {list(self.hidden)}, "
                f"out {self.out_features}); fix model.net.hidden"
            )


class MLP(nn.Module):
    """(B, *) -> (B, out_features): Linear -> activation -> dropout per hidden width, then Linear.

    Inputs are flattened from dim 1, so images (B, C, H, W) work as well as vectors (B, D).
    `hidden=[20]` with in/out 10 is the classic 10 -> 20 -> 10 network.
    """

    config_class = MLPConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """`MLP(MLPConfig(...))`, or MLPConfig's fields: `MLP(10, 10, hidden=[20])`."""
        super().__init__()
        self.config = cfg = build_config(MLPConfig, args, kwargs)
        self.in_features, self.out_features = cfg.in_features, cfg.out_features
        layers: list[nn.Module] = []
        width = cfg.in_features
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[cfg.activation]()]
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            width = h
        layers.append(nn.Linear(width, cfg.out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, D)
        if x.shape[1] != self.in_features:
            raise ValueError(f"MLP expects {self.in_features} input features, got {x.shape[1]}")
        return self.layers(x)  # (B, out_features)
