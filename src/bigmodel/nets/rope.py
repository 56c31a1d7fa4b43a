"""Rotary positions (RoPE) of the decoder (bigmodel.nets.gpt): the angle of each pair of head
dimensions, scaled as a checkpoint's `rope_scaling` says (`linear`, `llama3`), and the rotation
of queries and keys by those angles in Hugging Face's layout (the two halves of a head are the
pairs). `cfg` is the decoder's GPTConfig: its `dim_per_head`, `rope_theta`, `rope_scaling`.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def inv_frequencies(cfg: Any, device: torch.device | None = None) -> torch.Tensor:
    """The rotary angle per position of each pair of head dimensions (head_dim / 2,), fp32,
    scaled as `rope_scaling` says."""
    dim = cfg.dim_per_head
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv = 1.0 / (cfg.rope_theta**exponents)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":  # positions interpolated: every angle slowed by `factor`
        return inv / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: long wavelengths (beyond the original context / low_freq_factor) are slowed
        # by `factor`, short ones (below original / high_freq_factor) kept, those between blended
        factor, low, high = (
            scaling["factor"],
            scaling["low_freq_factor"],
            scaling["high_freq_factor"],
        )
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        slowed = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * slowed / factor + smooth * slowed
        medium = ~(wavelen < old / high) * ~(wavelen > old / low)
        return torch.where(medium, blended, slowed)
    return inv


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x (B, nh, T, hs), with the two halves of each head as the pairs (the layout of
    Hugging Face's Llama weights); cos, sin (T, hs), or (B, 1, T, hs) for per-row positions."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # fp32 angles, rounded as Hugging Face does
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
