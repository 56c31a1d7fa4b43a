"""GPT-2 (`model_type: gpt2`, GPT2LMHeadModel) in and out of our decoder.

The layouts differ in three ways. GPT-2's projections are `Conv1D` layers, whose weight is stored
(in, out): the transpose of `nn.Linear`'s (out, in). Its head is tied to the token embedding and
left out of the file. It always has biases, so a net trained without them is written with zero
biases (the same function).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bigmodel.errors import UserError
from bigmodel.pretrained.adapter import Family, State
from bigmodel.pretrained.hf_files import taker

# GPT-2's activations that are the tanh approximation of GELU, as our GPT computes it
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
# our name in each block -> GPT-2's; all four are Conv1D in GPT-2
_LINEARS = {
    "attn.qkv": "attn.c_attn",
    "attn.proj": "attn.c_proj",
    "mlp.fc": "mlp.c_fc",
    "mlp.proj": "mlp.c_proj",
}
_NORMS = {"ln_1": "ln_1", "ln_2": "ln_2"}
# GPT-2 settings our GPT does not compute, with the value it does
_FIXED = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}


def net_config(hf: dict[str, Any], path: Path) -> dict[str, Any]:
    """`model.net` fields that compute what the GPT-2 of config.json computes."""
    act = hf.get("activation_function", "gelu_new")
    if act not in _TANH_GELU:
        raise UserError(
            f"{path}: activation_function={act} is not GPT-2's tanh GELU "
            f"({', '.join(_TANH_GELU)}); our GPT computes only that"
        )
    n_embd = int(hf.get("n_embd", 768))
    for key, value in _FIXED.items():
        if hf.get(key, value) != value:
            raise UserError(
                f"{path}: {key}={hf[key]} is not supported (our GPT computes {key}={value})"
            )
    return {
        "vocab_size": int(hf.get("vocab_size", 50257)),
        "block_size": int(hf.get("n_positions", hf.get("n_ctx", 1024))),
        "n_layer": int(hf.get("n_layer", 12)),
        "n_head": int(hf.get("n_head", 12)),
        "n_embd": n_embd,
        "bias": True,
        "layer_norm_epsilon": float(hf.get("layer_norm_epsilon", 1e-5)),
        "norm": "layernorm",
        "positions": "learned",
        "mlp": "gelu_tanh",
        "intermediate_size": int(hf.get("n_inner") or 4 * n_embd),
        "n_kv_head": None,
        "head_dim": None,
        "qk_norm": False,
        "qkv_bias": None,
        "proj_bias": None,
        "mlp_bias": None,
        "tie_embeddings": True,
        "rope_scaling": None,
        "sliding_window": None,
    }


def to_net(hf: State, cfg: Any, folder: Path) -> State:
    """GPT-2's tensors under our names and layout, for `net.load_state_dict`."""
    # transformers saves under `transformer.`; OpenAI's original files have no prefix
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    C, T, H = cfg.n_embd, cfg.block_size, cfg.hidden
    take = taker(hf, folder)
    # Conv1D (in, out) or, in files written from nn.Linear, already (out, in): the fused qkv
    # projection, (C, 3C) against (3C, C), tells the layouts apart
    qkv = hf.get("h.0.attn.c_attn.weight")
    conv1d = qkv is None or tuple(qkv.shape) == (C, 3 * C)
    wpe = take("wpe.weight", (int(hf["wpe.weight"].shape[0]) if "wpe.weight" in hf else T, C))
    if wpe.shape[0] < T:
        raise UserError(
            f"model.net.block_size={T} is longer than the {wpe.shape[0]} positions of "
            f"model.init_from={folder}"
        )
    out = {
        "wte.weight": take("wte.weight", (cfg.vocab_size, C)),
        "wpe.weight": wpe[:T],  # a shorter context keeps the first positions
        "ln_f.weight": take("ln_f.weight", (C,)),
        "ln_f.bias": take("ln_f.bias", (C,)),
    }
    sizes = {"attn.qkv": (3 * C, C), "attn.proj": (C, C), "mlp.fc": (H, C), "mlp.proj": (C, H)}
    for i in range(cfg.n_layer):
        for ours, theirs in _NORMS.items():
            for p in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{p}"] = take(f"h.{i}.{theirs}.{p}", (C,))
        for ours, theirs in _LINEARS.items():
            o, n = sizes[ours]
            w = take(f"h.{i}.{theirs}.weight", (n, o) if conv1d else (o, n))
            out[f"blocks.{i}.{ours}.weight"] = w.t() if conv1d else w
            out[f"blocks.{i}.{ours}.bias"] = take(f"h.{i}.{theirs}.bias", (o,))
    head = hf.get("lm_head.weight")
    if head is not None and not torch.equal(head, out["wte.weight"]):
        raise UserError(
            f"model.init_from={folder} has an output head of its own (not tied to the token "
            "embedding); our GPT-2 ties them"
        )
    out["lm_head.weight"] = out["wte.weight"]
    return out


def from_net(net: nn.Module) -> State:
    """Our GPT's weights in GPT-2's names and Conv1D layout (merged LoRA layers included)."""
    from bigmodel.pretrained.lora import merged_weight

    C = net.config.n_embd

    def norm(m: nn.LayerNorm, name: str) -> State:
        b = m.bias if m.bias is not None else torch.zeros(C, dtype=m.weight.dtype)
        return {f"{name}.weight": m.weight, f"{name}.bias": b}

    out = {"transformer.wte.weight": net.wte.weight, "transformer.wpe.weight": net.wpe.weight}
    out.update(norm(net.ln_f, "transformer.ln_f"))
    for i, block in enumerate(net.blocks):
        for ours, theirs in _NORMS.items():
            out.update(norm(getattr(block, ours), f"transformer.h.{i}.{theirs}"))
        for ours, theirs in _LINEARS.items():
            linear = block.get_submodule(ours)
            w = merged_weight(linear)  # (out, in)
            b = linear.bias if linear.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
            out[f"transformer.h.{i}.{theirs}.weight"] = w.t()  # Conv1D: (in, out)
            out[f"transformer.h.{i}.{theirs}.bias"] = b
    return out


def hf_config(cfg: Any) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.hidden,
        "activation_function": "gelu_new" if cfg.mlp == "gelu_tanh" else cfg.mlp,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
    }


def modules(cfg: Any) -> dict[str, list[tuple[str, int, int]]]:
    """Our Linear layers are GPT-2's, one to one."""
    C, H = cfg.n_embd, cfg.hidden
    rows = {"attn.qkv": 3 * C, "attn.proj": C, "mlp.fc": H, "mlp.proj": C}
    return {ours: [(theirs, 0, rows[ours])] for ours, theirs in _LINEARS.items()}


FAMILY = Family(
    "gpt2",
    "GPT2LMHeadModel",
    net_config,
    to_net,
    from_net,
    hf_config,
    layer_prefix="transformer.h.{i}.",
    modules=modules,
    fan_in_fan_out=True,
)
