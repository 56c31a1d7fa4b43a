"""What an adapter of one Hugging Face model family to our decoder is (bigmodel.pretrained.hf
keeps them in a registry by model_type)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    """The adapter of one Hugging Face model_type to our decoder."""

    model_type: str
    """config.json's `model_type` (gpt2, llama, ...), also the net's `family` field."""
    architecture: str
    """The transformers class an exported folder names (`LlamaForCausalLM`)."""
    net_config: Callable[[dict[str, Any], Path], dict[str, Any]]
    """config.json -> the `model.net` fields that compute the same; refuses what it cannot."""
    to_net: Callable[[State, Any, Path], State]
    """The folder's tensors, the net's config, the folder -> the net's state dict."""
    from_net: Callable[[nn.Module], State]
    """Our net (merged LoRA layers included) -> the tensors under the family's names."""
    hf_config: Callable[[Any], dict[str, Any]]
    """The net's config -> config.json (without architectures, token ids, dtype)."""
    layer_prefix: str
    """Where block i's modules are in the family's model (`model.layers.{i}.`)."""
    modules: Callable[[Any], dict[str, list[tuple[str, int, int]]]]
    """The net's config -> each Linear of our blocks as the family's modules: layer -> [(module
    within the family's layer, first row, end row)] (`attn.qkv` -> q_proj, k_proj, v_proj)."""
    fan_in_fan_out: bool = False
    """The family's modules store weights (in, out) (GPT-2's Conv1D): PEFT must know it."""
