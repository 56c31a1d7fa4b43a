"""A decoder-only transformer language model (GPT-2 style).

Pre-norm blocks, causal self-attention through `scaled_dot_product_attention` (flash / memory
efficient kernels where the device has them), tied input and output embeddings, GPT-2 init.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bigmodel.errors import UserError
from bigmodel.nets import layers
from bigmodel.nets.layers import build_config


def check_sampling(
    temperature: float, top_k: int | None, max_new_tokens: int, prefix: str = ""
) -> None:
    """Refuse sampling settings that would silently mean something else; `prefix` is where the
    keys live in the config (e.g. `callbacks.text_sample.`)."""
    if not temperature >= 0:  # also NaN
        raise UserError(
            f"{prefix}temperature={temperature} must be >= 0; 0 decodes greedily (the most "
            "likely token each step), higher values sample more randomly"
        )
    if top_k is not None and top_k < 1:
        raise UserError(
            f"{prefix}top_k={top_k} must be >= 1; {prefix}top_k=null samples from all tokens"
        )
    if max_new_tokens < 0:
        raise UserError(f"{prefix}max_new_tokens={max_new_tokens} must be >= 0")


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    """Number of token ids; filled from the tokenizer by the data module when left as `???`."""
    block_size: int = 1024
    """Longest context the position embedding covers."""
    n_layer: int = 12
    """Transformer blocks."""
    n_head: int = 12
    """Attention heads per block; each is n_embd / n_head wide."""
    n_embd: int = 768
    """Width of the residual stream (the embeddings)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches (0 for pre-training)."""
    bias: bool = True
    """Bias in Linear and LayerNorm layers; False is a little faster and as good."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass: trades ~30 % compute for activation memory."""
    layer_norm_epsilon: float = 1e-5
    """The epsilon of every LayerNorm (GPT-2's `layer_norm_epsilon`; torch's default)."""

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                "change model.net.n_embd or model.net.n_head"
            )
        for name in (
            "vocab_size",
            "block_size",
            "n_layer",
            "n_head",
            "n_embd",
            "layer_norm_epsilon",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.net.{name} must be positive, got {getattr(self, name)}")


class Block(layers.Block):
    """GPT's block: causal self-attention with one fused qkv projection, a 4x MLP with GPT-2's
    tanh-approximated GELU."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__(cfg.n_embd, cfg.n_head, 4, cfg.dropout, cfg.bias, causal=True, gelu="tanh")


class GPT(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    config_class = GPTConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """`GPT(GPTConfig(...))`, or GPTConfig's fields: `GPT(vocab_size=65, n_layer=4)`."""
        super().__init__()
        self.config = cfg = build_config(GPTConfig, args, kwargs)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # Weight tying: the output projection reuses the token embedding (fewer parameters, and
        # rare tokens still get a sensible output vector).
        self.lm_head.weight = self.wte.weight
        for m in self.modules():  # one epsilon for every norm, as GPT-2's config gives it
            if isinstance(m, nn.LayerNorm):
                m.eps = cfg.layer_norm_epsilon
        self.apply(self._init_weights)
        # GPT-2: scale the init of each residual output projection by 1/sqrt(2 * n_layer) so the
        # residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position embedding is left out by default, as GPT-2 reports."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B."""
        cfg, T = self.config, seq_len or self.config.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * T

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if self.config.block_size < T:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            if self.config.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab_size)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend each row of idx (B, T) by max_new_tokens sampled tokens -> (B, T + n).

        temperature=0 is greedy decoding (the most likely token each step, top_k unused);
        top_k=None samples from all tokens.
        """
        check_sampling(temperature, top_k, max_new_tokens)
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.config.block_size :]  # crop to the context the model can see
            logits = self(ctx)[:, -1, :]  # (B, vocab)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits.float(), dim=-1)
                nxt = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
