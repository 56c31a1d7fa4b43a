"""A small ResNet for images, and its body and classifier head, which the audio CNN reuses for
spectrograms seen as 1-channel images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from bigmodel.nets.layers import build_config, load_old_names


def check_num_classes(num_classes: int) -> None:
    """Refuse a classifier of fewer than 2 classes (the configs of CNN and AudioCNN)."""
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got num_classes={num_classes}")


@dataclass
class CNNConfig:
    num_classes: int
    """Number of classes; filled from the data module when left as `???`."""
    in_channels: int = 3
    """Image channels (1 grey, 3 RGB); filled from the data module when left as `???`."""
    widths: list[int] | tuple[int, ...] = (32, 64, 128)
    """Channels per stage; every stage after the first halves the resolution."""
    blocks_per_stage: int = 1
    """Basic blocks (two 3x3 convs and a shortcut) per stage."""
    dropout: float = 0.0
    """Dropout on the pooled features, before the output layer."""

    def __post_init__(self) -> None:
        check_num_classes(self.num_classes)


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm and a residual connection (ResNet-18 style)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        # Zero-init the last norm so each block starts as the identity: deeper nets train as
        # easily as shallow ones from the first step.
        nn.init.zeros_(self.bn2.weight)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNetBody(nn.Module):
    """(B, C, H, W) -> feature maps (B, widths[-1], H', W'): stem, stages (stride 2 after the
    first)."""

    def __init__(self, in_channels: int, widths: list[int], blocks_per_stage: int = 1) -> None:
        super().__init__()
        if not widths or in_channels <= 0 or blocks_per_stage <= 0:
            raise ValueError(
                f"the CNN needs widths, in_channels and blocks_per_stage > 0 (got {list(widths)}, "
                f"{in_channels}, {blocks_per_stage}); fix model.net"
            )
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages, c = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks_per_stage):
                stages.append(BasicBlock(c, w, stride=2 if (i > 0 and j == 0) else 1))
                c = w
        self.blocks = nn.Sequential(*stages)
        self.out_features = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))  # (B, C', H', W')


class ClassifierHead(nn.Module):
    """Feature maps (B, C, H, W) -> class logits (B, num_classes): global average pooling,
    dropout, Linear."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)
        # Checkpoints written before this class hold the Linear as the net's `head` itself.
        load_old_names(self, {"weight": "fc.weight", "bias": "fc.bias"})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Global average pooling: any input size works, down to 1x1 after the strides.
        x = x.mean(dim=(2, 3))  # (B, C)
        return self.fc(self.dropout(x))  # (B, num_classes)


class CNN(nn.Module):
    """Images (B, in_channels, H, W) -> class logits (B, num_classes)."""

    config_class = CNNConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """`CNN(CNNConfig(...))`, or CNNConfig's fields: `CNN(10, in_channels=1)`."""
        super().__init__()
        self.config = cfg = build_config(CNNConfig, args, kwargs)
        self.num_classes = cfg.num_classes
        self.body = ResNetBody(cfg.in_channels, list(cfg.widths), cfg.blocks_per_stage)
        self.head = ClassifierHead(self.body.out_features, cfg.num_classes, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))  # (B, num_classes)
