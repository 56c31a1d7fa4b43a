"""What the nets share: RMSNorm under autocast, the transformer layers of the ViT and the seq2seq
transformer (multi-head attention, MLP, pre-norm block), the attention kernel call every
transformer makes (`sdpa`, the GPT's too), and two helpers of every net's constructor.

Each net binds its config to these layers' arguments (`bigmodel.nets.vit.Block`, ...). The names
of the parameters are those of the checkpoints, and they are created in the order each net's
init (and so a seed) expects.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

C = TypeVar("C")
_no_context = contextlib.nullcontext()


class RMSNorm(nn.RMSNorm):
    """torch's RMSNorm, computed in the weight's dtype when the input has another one.

    Under bf16 autocast the input arrives in bf16 and the weight stays fp32: torch then falls back
    to its unfused kernel with a warning each run. Upcasting the input runs the fused kernel in
    fp32, as autocast does for LayerNorm, and hands back the input's dtype (the same values here).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or x.dtype == self.weight.dtype:
            return super().forward(x)
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


def build_config(config_class: type[C], args: tuple, kwargs: dict[str, Any]) -> C:
    """A net's typed config from its constructor's arguments: one `config_class` instance
    (positional or `config=`), or the dataclass's fields by position or name, as `model.net`
    in the configs passes them."""
    config = kwargs.pop("config", None)
    if config is None and len(args) == 1 and isinstance(args[0], config_class):
        config, args = args[0], ()
    if config is None:
        return config_class(*args, **kwargs)
    if args or kwargs:
        raise TypeError(f"pass a {config_class.__name__} or its fields, not both")
    return config


def _rename_keys(renames: dict[str, str], module: nn.Module, state_dict, prefix, *_) -> None:
    for key in list(state_dict):
        for old, new in renames.items():
            if key.startswith(prefix + old):
                state_dict[prefix + new + key[len(prefix + old) :]] = state_dict.pop(key)
                break


def load_old_names(module: nn.Module, renames: dict[str, str]) -> None:
    """Let `module` load state dicts written under earlier names of its entries: before loading,
    a key that starts with `old` (below the module) is made to start with `new`."""
    # functools.partial of a module-level function, not a closure: the net stays picklable
    # (strategy=ddp_spawn sends it to the worker processes).
    module.register_load_state_dict_pre_hook(functools.partial(_rename_keys, renames))


class Attention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention` (flash / memory-efficient
    kernels where the device has them).

    fused_qkv=True: one C -> 3C projection for queries, keys and values (GPT, ViT); self-attention
    only. False: a query projection and a C -> 2C key/value projection, so that keys and values
    can also come from another sequence (cross-attention) or a decoding cache (seq2seq).
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        dropout: float = 0.0,
        bias: bool = True,
        fused_qkv: bool = True,
    ) -> None:
        super().__init__()
        self.n_head, self.fused_qkv = n_head, fused_qkv
        if fused_qkv:
            self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        else:
            self.q = nn.Linear(n_embd, n_embd, bias=bias)
            self.kv = nn.Linear(n_embd, 2 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # (B, T, C) -> (B, nh, T, hs): heads become a batch dimension for SDPA
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, C) -> keys and values 2 x (B, nh, S, hs) (separate projections only)."""
        k, v = self.kv(x).chunk(2, dim=-1)
        return self.heads(k), self.heads(v)

    def attend(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Queries from x (B, T, C) over keys and values (B, nh, S, hs) -> (B, T, C).

        mask (B, 1, 1, S): True where a key may be attended to (None: every key).
        """
        return self._mix(self.heads(self.q(x)), k, v, mask, is_causal)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        cache: dict | None = None,
    ) -> torch.Tensor:
        """Self-attention of x (B, T, C) -> (B, T, C).

        cache: decoding one new token a step (T = 1); this layer's keys and values of the tokens
        before it, extended in place. The new token attends to all of them: no mask needed.
        """
        if self.fused_qkv:
            q, k, v = (self.heads(t) for t in self.qkv(x).split(x.shape[-1], dim=2))
        else:
            k, v = self.keys_values(x)
            q = self.heads(self.q(x))
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"], is_causal = k, v, False
        return self._mix(q, k, v, mask, is_causal)

    def _mix(self, q, k, v, mask, is_causal) -> torch.Tensor:
        B, _, T, hs = q.shape
        y = sdpa(q, k, v, mask, is_causal, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * hs)  # (B, T, C)
        return self.resid_dropout(self.proj(y))


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """`scaled_dot_product_attention` of q (B, nh, T, hs) over k, v (B, nkv, S, hs) -> (B, nh, T,
    hs) in q's dtype. nkv may divide nh (grouped-query attention: each key/value head serves
    nh / nkv query heads)."""
    dtype = q.dtype
    if q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        # torch's CPU flash-attention backward is ~9x slower in bf16 than in fp32 at GPT
        # sizes (torch 2.13, B=12 T=64 C=128), while bf16 matmuls are 2-4x faster: on a
        # CPU the rest of the step runs in half precision and attention in fp32
        q, k, v = q.float(), k.float(), v.float()
    gqa = {}
    if k.shape[1] != q.shape[1]:
        if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
            # graph exporters may lack SDPA's enable_gqa: repeat each key/value head instead
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        else:
            gqa = {"enable_gqa": True}
    with torch.autocast("cpu", enabled=False) if dtype != q.dtype else _no_context:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p, **gqa
        ).to(dtype)


class MLP(nn.Module):
    """(B, T, C) -> (B, T, C): Linear to `hidden`, GELU, Linear back, dropout.

    gelu: `none` (the exact erf GELU) or `tanh` (GPT-2's approximation).
    """

    def __init__(
        self, n_embd: int, hidden: int, dropout: float = 0.0, bias: bool = True, gelu: str = "none"
    ) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden, bias=bias)
        self.proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.gelu = gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate=self.gelu)))


class Block(nn.Module):
    """Pre-norm transformer block, (B, T, C) -> (B, T, C):
    x + attn(ln_1(x)), [x + cross_attn(ln_2(x), memory)], then x + mlp(ln(x)).

    causal: each position attends only to itself and earlier ones (GPT, seq2seq decoder).
    cross_attention: attend to an encoder's output too (seq2seq decoder); that attention projects
    queries and keys/values separately (they come from different sequences).
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        bias: bool = True,
        *,
        causal: bool = False,
        fused_qkv: bool = True,
        cross_attention: bool = False,
        gelu: str = "none",
    ) -> None:
        super().__init__()
        self.causal = causal
        # The names are those of the checkpoints: ln_1 attn ln_2 mlp, and for the seq2seq
        # decoder ln_1 self_attn ln_2 cross_attn ln_3 mlp (a norm before each sub-layer).
        self.cross_attn: Attention | None = None
        if cross_attention:
            self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
            self.self_attn = Attention(n_embd, n_head, dropout, bias, fused_qkv)
            self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
            self.cross_attn = Attention(n_embd, n_head, dropout, bias, fused_qkv=False)
            self.ln_3 = nn.LayerNorm(n_embd, bias=bias)
        else:
            self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
            self.attn = Attention(n_embd, n_head, dropout, bias, fused_qkv)
            self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, mlp_ratio * n_embd, dropout, bias, gelu)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        memory_mask: torch.Tensor | None = None,
        cache: dict | None = None,
    ) -> torch.Tensor:
        """mask (B, 1, 1, T): keys of x that may be attended to (None: all). memory_kv: the
        cross-attention keys and values of the encoder output, 2 x (B, nh, S, hs)
        (`cross_attn.keys_values(memory)`), with its mask memory_mask (B, 1, 1, S). cache: see
        `Attention.forward`."""
        if self.cross_attn is None:
            x = x + self.attn(self.ln_1(x), mask, self.causal, cache)
            return x + self.mlp(self.ln_2(x))
        x = x + self.self_attn(self.ln_1(x), mask, self.causal, cache)
        x = x + self.cross_attn.attend(self.ln_2(x), *memory_kv, mask=memory_mask)
        return x + self.mlp(self.ln_3(x))
