"""A small ResNet for images, and for spectrograms seen as 1-channel images."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    """(B, C, H, W) -> (B, widths[-1]): stem, stages (stride 2 after the first), mean pooling."""

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
        x = self.blocks(self.stem(x))  # (B, C', H', W')
        # Global average pooling: any input size works, down to 1x1 after the strides.
        return x.mean(dim=(2, 3))  # (B, C')


class CNN(nn.Module):
    """Images (B, in_channels, H, W) -> class logits (B, num_classes)."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: list[int] | tuple[int, ...] = (32, 64, 128),
        blocks_per_stage: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(
                f"a classifier needs at least 2 classes, got num_classes={num_classes}"
            )
        self.num_classes = num_classes
        self.body = ResNetBody(in_channels, list(widths), blocks_per_stage)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.body.out_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.body(x)))  # (B, num_classes)
