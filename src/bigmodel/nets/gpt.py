"""The decoder-only transformer language model: one configurable net of which GPT-2, Llama,
Qwen2/3 and Mistral are presets (configs/model/*.yaml).

One typed config, litgpt's approach, rather than a module per family (torchtitan's): the families
differ in a handful of switches (norm, positions, MLP, key/value heads, QK-norm, biases, tied
head), so one set of layers with those switches keeps every family's code path the same, the
weights' names the same (LoRA targets, FSDP units and checkpoints work across families), and a new
family a config plus its Hugging Face adapter (bigmodel.pretrained). The net is still called
`GPT`, as litgpt calls its own: checkpoints name it, and its defaults are GPT-2's.

Pre-norm blocks, causal self-attention through `scaled_dot_product_attention` (flash / memory
efficient kernels where the device has them), GPT-2 init. Queries, keys and values come from one
fused projection (`attn.qkv`) and a gated MLP's gate and up projections from one (`mlp.fc`): one
matmul each, and the names GPT-2 checkpoints already use.

Decoding runs from a key/value cache (`KVCache`, `GPT.new_cache`): the prompt is run once
(prefill) and each new token attends to the keys and values the cache holds, instead of running
the model over the whole prefix again. A batch of prompts of different lengths is left-padded;
`pad_mask` says which positions are real, and each row's positions count its own tokens only, so
that every row decodes as it would alone.
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
from bigmodel.nets.kv_cache import KVCache, PastKV, RollingKVCache
from bigmodel.nets.layers import RMSNorm, build_config, sdpa
from bigmodel.nets.masks import packed_positions_and_mask, positions_and_mask
from bigmodel.nets.rope import inv_frequencies, rotate
from bigmodel.sampling import generate

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rotary")
MLPS = ("gelu", "gelu_tanh", "swiglu", "relu2")
# rope_scaling types computed here ("default" is none); others are refused
ROPE_TYPES = ("default", "linear", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    """Number of token ids; filled from the tokenizer by the data module when left as `???`."""
    block_size: int = 1024
    """Longest context: the rows of a learned position table, the longest window trained on."""
    n_layer: int = 12
    """Transformer blocks."""
    n_head: int = 12
    """Query heads per block, each head_dim wide."""
    n_embd: int = 768
    """Width of the residual stream (the embeddings)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches (0 for pre-training)."""
    bias: bool = True
    """Bias in Linear layers and LayerNorms (GPT-2); qkv_bias, proj_bias, mlp_bias override it."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass: trades ~30 % compute for activation memory."""
    layer_norm_epsilon: float = 1e-5
    """The epsilon of every norm (GPT-2's `layer_norm_epsilon`, Llama's `rms_norm_eps`)."""
    norm: str = "layernorm"
    """layernorm (GPT-2) or rmsnorm (Llama, Qwen, Mistral)."""
    positions: str = "learned"
    """learned (a table of block_size rows, GPT-2) or rotary (RoPE on queries and keys)."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies (Llama 3: 500000; Qwen3: 1000000)."""
    rope_scaling: dict | None = None
    """Rotary frequency scaling, as Hugging Face's `rope_scaling`: {rope_type: linear, factor},
    {rope_type: llama3, factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings}; null for none."""
    mlp: str = "gelu_tanh"
    """gelu (exact), gelu_tanh (GPT-2), swiglu (gated SiLU: Llama, Qwen, Mistral) or relu2."""
    intermediate_size: int | None = None
    """Hidden width of the MLP; null: 4 x n_embd."""
    n_kv_head: int | None = None
    """Key/value heads; each serves n_head / n_kv_head query heads (1: MQA; null: n_head, MHA)."""
    head_dim: int | None = None
    """Width of each head; null: n_embd / n_head (Qwen3 sets it apart)."""
    qk_norm: bool = False
    """RMSNorm over each head of the queries and keys before the rotation (Qwen3)."""
    sliding_window: int | None = None
    """Sliding-window attention (Mistral v0.1, rotary only): each query sees itself and the
    window - 1 keys before it; decoding keeps only the window (RollingKVCache) and goes on past
    block_size. null: full causal attention."""
    qkv_bias: bool | None = None
    """Bias in the query/key/value projection; null: `bias` (Qwen2: true with bias false)."""
    proj_bias: bool | None = None
    """Bias in the attention output projection; null: `bias`."""
    mlp_bias: bool | None = None
    """Bias in the MLP's projections; null: `bias`."""
    tie_embeddings: bool = True
    """The output head reuses the token embedding (GPT-2, small Llamas) or has its own weights."""
    zero_init: bool = False
    """Residual output projections (attn.proj, mlp.proj) and an untied head start at zero (the
    modded-nanogpt speedrun): each block starts as the identity, the first logits are uniform."""
    family: str = "gpt2"
    """The Hugging Face model_type `export.py format=hf` writes this net as (gpt2, llama, qwen2,
    qwen3, mistral); it changes nothing in the computation."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.net.{name} must be positive, got {getattr(self, name)}")
        if not self.layer_norm_epsilon > 0:
            raise ValueError("model.net.layer_norm_epsilon must be positive")
        for name, allowed in (("norm", NORMS), ("positions", POSITIONS), ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                raise UserError(
                    f"model.net.{name}={getattr(self, name)} is not one of {', '.join(allowed)}"
                )
        if self.head_dim is None and self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                "change model.net.n_embd or model.net.n_head (or set model.net.head_dim)"
            )
        kv = self.kv_heads
        if kv <= 0 or self.n_head % kv != 0:
            raise UserError(
                f"model.net.n_kv_head={self.n_kv_head} must divide model.net.n_head="
                f"{self.n_head} (each key/value head serves a whole group of query heads)"
            )
        window = self.sliding_window
        if window is not None and (window < 1 or self.positions != "rotary"):
            raise UserError(
                f"model.net.sliding_window={window} needs positions=rotary and a window >= 1 "
                "(null: full causal attention)"
            )
        if self.positions == "rotary" and self.dim_per_head % 2:
            raise UserError(f"model.net.head_dim={self.dim_per_head} must be even for rotary")
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)  # a DictConfig from the config files
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ROPE_TYPES:
                raise UserError(
                    f"model.net.rope_scaling: rope_type {kind} is not computed here; the "
                    f"supported types are {', '.join(ROPE_TYPES)}"
                )
            need = {"linear": ("factor",), "llama3": LLAMA3_KEYS}.get(kind, ())
            lacking = [k for k in need if k not in self.rope_scaling]
            if lacking:
                raise UserError(f"model.net.rope_scaling ({kind}) lacks {', '.join(lacking)}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        return self.intermediate_size if self.intermediate_size is not None else 4 * self.n_embd

    def has_bias(self, which: str) -> bool:
        """Bias of one kind of Linear layer: qkv, proj or mlp."""
        own = getattr(self, f"{which}_bias")
        return self.bias if own is None else own


def make_norm(cfg: GPTConfig, width: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(width, eps=cfg.layer_norm_epsilon)
    return nn.LayerNorm(width, eps=cfg.layer_norm_epsilon, bias=cfg.bias)


class CausalSelfAttention(nn.Module):
    """(B, T, C) -> (B, T, C): n_head query heads over n_kv_head key/value heads, causal."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.dim_per_head
        q, kv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.qkv = nn.Linear(cfg.n_embd, q + 2 * kv, bias=cfg.has_bias("qkv"))
        self.split = (q, kv, kv)
        if cfg.qk_norm:  # per head, over head_dim (Qwen3)
            self.q_norm = RMSNorm(self.head_dim, eps=cfg.layer_norm_epsilon)
            self.k_norm = RMSNorm(self.head_dim, eps=cfg.layer_norm_epsilon)
        self.qk_norm = cfg.qk_norm
        self.proj = nn.Linear(q, cfg.n_embd, bias=cfg.has_bias("proj"))
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: tuple[KVCache | PastKV, int] | None = None,
        mask: torch.Tensor | None = None,
    ):
        """cache: (the cache, this layer's index) to append this step's keys and values to and
        attend over; mask: (B or 1, 1, T, S) True where a query may attend a key (None: causal
        over the T positions, or every cached key for one new token)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, nh, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim)  # (B, T, nkv, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # heads become a batch dimension for SDPA
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        dropout = self.dropout if self.training else 0.0
        # causal over the T positions: no cache, or the prefill of an empty one (a Python bool,
        # which graph export needs; one new token over a cache attends to every key)
        causal = mask is None and (cache is None or cache[0].empty)
        if cache is not None:
            k, v = cache[0].append(cache[1], k, v)  # (B, nkv, S, hs), S = cached + T
        y = sdpa(q, k, v, mask=mask, is_causal=causal, dropout_p=dropout)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """(B, T, C) -> (B, T, C). A gated MLP (swiglu) computes its gate and its up projection with
    one Linear, `fc`, of twice the hidden width: the gate is the first half."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        gated = cfg.mlp == "swiglu"
        self.fc = nn.Linear(cfg.n_embd, (2 if gated else 1) * cfg.hidden, bias=cfg.has_bias("mlp"))
        self.proj = nn.Linear(cfg.hidden, cfg.n_embd, bias=cfg.has_bias("mlp"))
        self.dropout = nn.Dropout(cfg.dropout)
        self.kind = cfg.mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, T, H) or (B, T, 2H)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """Pre-norm block, (B, T, C) -> (B, T, C): x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        # the names are those of the checkpoints; the order is the init's (and so a seed's)
        self.ln_1 = make_norm(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: tuple[KVCache | PastKV, int] | None = None,
        mask: torch.Tensor | None = None,
    ):
        x = x + self.attn(self.ln_1(x), rope, cache, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    config_class = GPTConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """`GPT(GPTConfig(...))`, or GPTConfig's fields: `GPT(vocab_size=65, n_layer=4)`."""
        super().__init__()
        self.config = cfg = build_config(GPTConfig, args, kwargs)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.positions == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # the output projection reuses the token embedding (fewer parameters, and rare
            # tokens still get a sensible output vector)
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the init of each residual output projection by 1/sqrt(2 * n_layer) so the
        # residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.zero_init:  # after the draws above: a seed gives the same other weights
            for name, p in self.named_parameters():  # a tied head is named wte.weight here
                if name.endswith("proj.weight") or name == "lm_head.weight":
                    nn.init.zeros_(p)

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

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def sliding_window(self) -> int | None:
        """The attention window, or None: bigmodel.sampling decodes past block_size with it."""
        return self.config.sliding_window

    def roles(self) -> dict[str, tuple[str, tuple[int, int] | None]]:
        """Where each projection of a block lives: role -> (Linear within the block, its output
        rows, or None for all of them). The fused layers hold several roles: attn.qkv has q, k,
        v; a SwiGLU's mlp.fc has gate, up. (LoRA targets and PEFT adapters go by role.)"""
        cfg = self.config
        q, kv, H = cfg.n_head * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head, cfg.hidden
        out = {
            "q": ("attn.qkv", (0, q)),
            "k": ("attn.qkv", (q, q + kv)),
            "v": ("attn.qkv", (q + kv, q + 2 * kv)),
            "o": ("attn.proj", None),
        }
        if cfg.mlp == "swiglu":
            out.update(gate=("mlp.fc", (0, H)), up=("mlp.fc", (H, 2 * H)))
        else:
            out["up"] = ("mlp.fc", None)
        out["down"] = ("mlp.proj", None)
        return out

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; a position table is left out by default, as GPT-2 reports."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding and hasattr(self, "wpe") else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B."""
        cfg, T = self.config, seq_len or self.config.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.dim_per_head * T

    def rope(self, T: int, device: torch.device, dtype: torch.dtype):
        """cos, sin (T, head_dim) of the rotary positions 0..T-1; None for learned positions."""
        return self.rope_at(torch.arange(T, device=device), dtype)

    def rope_at(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin (..., T, head_dim) of the rotary positions (..., T); None for learned ones.

        Computed in fp32 from the config at each call (a few hundred numbers): no buffer that a
        cast to bf16 would round, nothing in the state dict.
        """
        if self.config.positions != "rotary":
            return None
        inv = inv_frequencies(self.config, positions.device)
        freqs = positions.float().unsqueeze(-1) * inv  # (..., T, hs / 2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (..., T, hs): one angle per pair of halves
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def new_cache(self, batch: int, size: int, device=None, dtype=None) -> KVCache:
        """An empty key/value cache for `batch` rows of `size` positions (past block_size: a
        RollingKVCache of the sliding window), in the dtype of the net's weights unless told."""
        cfg, weight = self.config, self.wte.weight
        shape = (cfg.n_layer, batch, cfg.kv_heads, size, cfg.dim_per_head)
        where = (device or weight.device, dtype or weight.dtype)
        if size <= cfg.block_size:
            return KVCache(*shape, *where)
        if cfg.sliding_window is None:
            raise ValueError(f"a cache of {size} positions exceeds block_size {cfg.block_size}")
        return RollingKVCache(*shape, cfg.sliding_window, *where)

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | PastKV | None = None,
        pad_mask: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, vocab_size).

        cache: a KVCache holding the positions before idx; their keys and values are attended
        to and idx's are appended (its length advances by T). pad_mask (B, cached + T): True at
        the real tokens of left-padded rows; each row's positions count its real tokens only.
        documents (B, T): for a window that packs several sequences, which one each token
        belongs to (equal ids in one run): positions restart at each and a token attends to its
        own sequence only (a block-diagonal causal mask), as if each ran alone.
        """
        B, T = idx.shape
        if documents is not None and (cache is not None or pad_mask is not None):
            raise ValueError("documents (packed windows) take neither a cache nor pad_mask")
        past = cache.length if cache is not None else 0
        rolling = isinstance(cache, RollingKVCache)  # any length (and rows without padding)
        if self.config.block_size < past + T and not rolling:
            raise ValueError(
                f"sequence length {past + T} exceeds block_size {self.config.block_size}"
            )
        # the window binds where keys can be further back than it: a rolling cache's prefill
        # (its steps see the filled slots, which hold the window), or a block_size beyond it
        window = self.config.sliding_window
        if window is not None and (past > 0 if rolling else window >= self.config.block_size):
            window = None
        x = self.wte(idx)  # (B, T, C)
        mask = None
        if documents is not None:
            positions, mask = packed_positions_and_mask(documents, window)
        elif cache is None and pad_mask is None and window is None:  # training: plain causal
            positions = torch.arange(T, device=idx.device)
        else:
            positions, mask = positions_and_mask(B, T, past, pad_mask, idx.device, window)
        if hasattr(self, "wpe"):
            x = x + self.wpe(positions)
        x = self.drop(x)
        rope = self.rope_at(positions, x.dtype)
        if rope is not None and positions.dim() == 2:  # per-row positions: (B, 1, T, hs)
            rope = (rope[0].unsqueeze(1), rope[1].unsqueeze(1))
        for i, block in enumerate(self.blocks):
            layer_cache = (cache, i) if cache is not None else None
            if self.config.activation_checkpointing and self.training:
                x = checkpoint(block, x, rope, layer_cache, mask, use_reentrant=False)
            else:
                x = block(x, rope, layer_cache, mask)
        if cache is not None:
            cache.length = past + T
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
        """Extend each row of idx (B, T) by max_new_tokens sampled tokens -> (B, T + n)
        (bigmodel.sampling.generate; temperature=0 is greedy)."""
        return generate(
            self, idx, max_new_tokens, self.config.block_size, temperature, top_k, generator
        )
