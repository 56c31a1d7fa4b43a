"""A Vision Transformer: patches -> tokens -> pre-norm transformer blocks -> class logits.

The blocks follow the GPT's style (pre-norm, SDPA, GELU MLP) without the causal mask: every patch
attends to every other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ViTConfig:
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    """Side of the (square) input images; filled from the data module when left as `???`."""
    patch_size: int = 4
    n_layer: int = 6
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.0
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


class SelfAttention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """Images (B, in_channels, H, W) -> class logits (B, num_classes)."""

    def __init__(self, config: ViTConfig | None = None, **kwargs) -> None:
        super().__init__()
        cfg = config or ViTConfig(**kwargs)
        self.config = cfg
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
