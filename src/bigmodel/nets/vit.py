"""A Vision Transformer: patches -> tokens -> pre-norm transformer blocks -> class logits.

The blocks are the pre-norm blocks of nets/layers.py (SDPA, GELU MLP), as in the GPT but without
the causal mask: every patch attends to every other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from bigmodel.nets import layers
from bigmodel.nets.layers import build_config, load_old_names


@dataclass
class ViTConfig:
    num_classes: int = 10
    """Number of classes; filled from the data module when left as `???`."""
    in_channels: int = 3
    """Image channels (1 grey, 3 RGB); filled from the data module when left as `???`."""
    image_size: int = 32
    """Side of the (square) input images; filled from the data module when left as `???`."""
    patch_size: int = 4
    """Side of the square patches that become tokens; must divide image_size."""
    n_layer: int = 6
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block; each is n_embd / n_head wide."""
    n_embd: int = 128
    """Width of the tokens."""
    mlp_ratio: int = 4
    """Hidden width of each block's MLP, in multiples of n_embd."""
    dropout: float = 0.0
    """Dropout on the embeddings, attention weights and residual branches."""
    pool: str = "cls"
    """`cls`: classify from a learned class token; `mean`: from the mean of the patch tokens."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass: trades compute for activation memory."""

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image size {self.image_size} is not a multiple of model.net.patch_size="
                f"{self.patch_size}; choose a patch size that divides it or set data.image_size"
            )
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                "change model.net.n_embd or model.net.n_head"
            )
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"model.net.pool={self.pool} is not one of: cls, mean")
        if self.num_classes < 2:
            raise ValueError(
                f"a classifier needs at least 2 classes, got num_classes={self.num_classes}"
            )


class Block(layers.Block):
    """ViT's block: self-attention over all patches (no mask) with one fused qkv projection, an
    MLP with the exact GELU; biases everywhere."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__(cfg.n_embd, cfg.n_head, cfg.mlp_ratio, cfg.dropout)
        # Checkpoints written before the shared MLP hold it as Sequential(fc, GELU, proj, dropout).
        load_old_names(self.mlp, {"0.": "fc.", "2.": "proj."})


class ViT(nn.Module):
    """Images (B, in_channels, H, W) -> class logits (B, num_classes)."""

    config_class = ViTConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """`ViT(ViTConfig(...))`, or ViTConfig's fields: `ViT(num_classes=10, image_size=8)`."""
        super().__init__()
        self.config = cfg = build_config(ViTConfig, args, kwargs)
        self.num_classes = cfg.num_classes
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        # A strided conv is the patch embedding: each patch_size x patch_size patch -> one token.
        self.patch_embed = nn.Conv2d(
            cfg.in_channels, cfg.n_embd, cfg.patch_size, stride=cfg.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.n_embd)) if cfg.pool == "cls" else None
        n_tokens = n_patches + (1 if cfg.pool == "cls" else 0)
        self.pos_embed = nn.Parameter(torch.randn(1, n_tokens, cfg.n_embd) * 0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        """Embeddings held as raw parameters; `optim.param_groups` never decays them."""
        return {"pos_embed"} | ({"cls_token"} if self.cls_token is not None else set())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.shape[-2:] != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"the ViT was built for {cfg.image_size}x{cfg.image_size} images, got "
                f"{tuple(x.shape[-2:])}; set model.net.image_size to the data's image size"
            )
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, C)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, C)
        x = self.drop(x + self.pos_embed)
        for block in self.blocks:
            if cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.ln_f(x)
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)  # (B, C)
        return self.head(x)  # (B, num_classes)
