"""A multi-layer perceptron: the introductory regression net, and a baseline for flat inputs."""

from __future__ import annotations

import torch
import torch.nn as nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


class MLP(nn.Module):
    """(B, *) -> (B, out_features): Linear -> activation -> dropout per hidden width, then Linear.

    Inputs are flattened from dim 1, so images (B, C, H, W) work as well as vectors (B, D).
    `hidden=[20]` with in/out 10 is the classic 10 -> 20 -> 10 network.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: list[int] | tuple[int, ...] = (20,),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"model.net.activation={activation} is not one of {', '.join(ACTIVATIONS)}; "
                "choose one of those"
            )
        if in_features <= 0 or out_features <= 0 or any(h <= 0 for h in hidden):
            raise ValueError(
                f"MLP widths must be positive (in {in_features}, hidden {list(hidden)}, out "
                f"{out_features}); fix model.net.hidden"
            )
        self.in_features, self.out_features = in_features, out_features
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, D)
        if x.shape[1] != self.in_features:
            raise ValueError(f"MLP expects {self.in_features} input features, got {x.shape[1]}")
        return self.layers(x)  # (B, out_features)
