"""Llama (`model_type: llama`: Llama 2, 3.x, SmolLM2, TinyLlama; LlamaForCausalLM) in and out of
our decoder, and the layout the Llama-style families share (hf_qwen2.py, hf_qwen3.py,
hf_mistral.py build on `Variant`).

The layout: `model.embed_tokens`, per layer `input_layernorm`, `self_attn.{q,k,v,o}_proj`
(optionally `q_norm`, `k_norm`), `post_attention_layernorm`, `mlp.{gate,up,down}_proj`, then
`model.norm` and `lm_head` (absent when tied). Ours fuses q, k, v into `attn.qkv` and gate, up into
`mlp.fc` (rows in that order); RMSNorm, rotary with the halves as pairs (as these weights are
laid out) and SwiGLU are the same functions.

A sliding attention window (Mistral v0.1's `sliding_window`, Qwen's `use_sliding_window`) is
full causal attention up to its length: the net's context is capped there (longer prompts are
refused). Mistral's window, on every layer, is also the net's `sliding_window`, so decoding goes
on past it from a rolling cache as transformers' does; Qwen's (on some layers only) is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bigmodel.errors import UserError
from bigmodel.pretrained.adapter import Family, State
from bigmodel.pretrained.hf_files import taker

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class Variant:
    """How one Llama-style family's config.json says what the layout computes."""

    model_type: str
    architecture: str
    qkv_bias: str | bool
    """The config.json key that turns on the q/k/v biases, or whether they are always there."""
    proj_bias: str | bool
    """The same for the attention output projection (o_proj)."""
    mlp_bias: str | bool
    """The same for gate, up and down."""
    qk_norm: bool
    """RMSNorm over each query and key head (Qwen3)."""
    head_dim: int | None = None
    """head_dim when config.json has none (null: hidden_size / num_attention_heads)."""
    max_positions: int = 2048
    """max_position_embeddings when config.json has none (the transformers class's default)."""
    window: str | None = None
    """Sliding window: `mistral` (sliding_window) or `qwen` (use_sliding_window, layer_types)."""


def _get(hf: dict[str, Any], key: str, default: Any) -> Any:
    value = hf.get(key)
    return default if value is None else value


def _switch(hf: dict[str, Any], rule: str | bool) -> bool:
    return bool(_get(hf, rule, False)) if isinstance(rule, str) else rule


def rope(hf: dict[str, Any], path: Path) -> tuple[float, dict | None]:
    """rope_theta and rope_scaling from config.json: transformers 5's `rope_parameters`, or the
    older `rope_theta` + `rope_scaling`."""
    key = "rope_parameters" if isinstance(hf.get("rope_parameters"), dict) else "rope_scaling"
    params = dict(hf.get(key) or {})
    if params and all(isinstance(v, dict) for v in params.values()):  # one per layer type
        raise UserError(f"{path}: {key} per layer type is not supported")
    theta = float(_get(params, "rope_theta", _get(hf, "rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UserError(
            f"{path}: {key} of rope_type {kind} is not supported; our decoder computes "
            f"{', '.join(ROPE_TYPES)}"
        )
    partial = _get(params, "partial_rotary_factor", _get(hf, "partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UserError(f"{path}: partial_rotary_factor={partial} is not supported (only 1.0)")
    if kind == "default":
        return theta, None
    scaling = {"rope_type": kind, "factor": float(params["factor"])}
    if kind == "llama3":
        for k in ("low_freq_factor", "high_freq_factor"):
            scaling[k] = float(params[k])
        scaling["original_max_position_embeddings"] = int(
            _get(params, "original_max_position_embeddings", hf.get("max_position_embeddings"))
        )
    return theta, scaling


def net_config(v: Variant, hf: dict[str, Any], path: Path) -> dict[str, Any]:
    """`model.net` fields that compute what the config.json's model computes."""
    act = _get(hf, "hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{path}: hidden_act={act} is not supported (our SwiGLU gates with silu)")
    if _get(hf, "attention_dropout", 0.0) != 0.0:
        raise UserError(
            f"{path}: attention_dropout={hf['attention_dropout']} is not supported; set it to 0 "
            "(model.net.dropout drops attention weights, embeddings and residuals alike)"
        )
    heads = int(hf["num_attention_heads"])
    width = int(hf["hidden_size"])
    theta, scaling = rope(hf, path)
    block = int(_get(hf, "max_position_embeddings", v.max_positions))
    sliding = v.window == "mistral" or (
        v.window == "qwen"
        and (hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []))
    )
    window = hf.get("sliding_window") if sliding else None
    if window is not None:
        block = min(block, int(window))  # within the window, sliding attention is causal
    return {
        "vocab_size": int(hf["vocab_size"]),
        "block_size": block,
        "n_layer": int(hf["num_hidden_layers"]),
        "n_head": heads,
        "n_kv_head": int(_get(hf, "num_key_value_heads", heads)),
        "n_embd": width,
        "head_dim": int(_get(hf, "head_dim", v.head_dim or width // heads)),
        "intermediate_size": int(hf["intermediate_size"]),
        "layer_norm_epsilon": float(_get(hf, "rms_norm_eps", 1e-6)),
        "norm": "rmsnorm",
        "positions": "rotary",
        "rope_theta": theta,
        "rope_scaling": scaling,
        "mlp": "swiglu",
        "bias": False,
        "qkv_bias": _switch(hf, v.qkv_bias),
        "proj_bias": _switch(hf, v.proj_bias),
        "mlp_bias": _switch(hf, v.mlp_bias),
        "qk_norm": v.qk_norm,
        "tie_embeddings": bool(_get(hf, "tie_word_embeddings", False)),
        "sliding_window": int(window) if window is not None and v.window == "mistral" else None,
    }


def to_net(v: Variant, hf: State, cfg: Any, folder: Path) -> State:
    """The folder's tensors under our names, q/k/v and gate/up fused, for `load_state_dict`."""
    take = taker(hf, folder)
    C, V, H = cfg.n_embd, cfg.vocab_size, cfg.hidden
    q, kv = cfg.n_head * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    out = {"wte.weight": take("model.embed_tokens.weight", (V, C))}
    for i in range(cfg.n_layer):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        out[b + "ln_1.weight"] = take(p + "input_layernorm.weight", (C,))
        out[b + "ln_2.weight"] = take(p + "post_attention_layernorm.weight", (C,))
        parts = (("q_proj", q), ("k_proj", kv), ("v_proj", kv))
        attn = p + "self_attn."
        out[b + "attn.qkv.weight"] = torch.cat(
            [take(f"{attn}{n}.weight", (o, C)) for n, o in parts]
        )
        if cfg.has_bias("qkv"):
            out[b + "attn.qkv.bias"] = torch.cat([take(f"{attn}{n}.bias", (o,)) for n, o in parts])
        out[b + "attn.proj.weight"] = take(attn + "o_proj.weight", (C, q))
        if cfg.has_bias("proj"):
            out[b + "attn.proj.bias"] = take(attn + "o_proj.bias", (C,))
        if cfg.qk_norm:
            out[b + "attn.q_norm.weight"] = take(attn + "q_norm.weight", (cfg.dim_per_head,))
            out[b + "attn.k_norm.weight"] = take(attn + "k_norm.weight", (cfg.dim_per_head,))
        mlp = p + "mlp."
        gate_up = (mlp + "gate_proj", mlp + "up_proj")
        out[b + "mlp.fc.weight"] = torch.cat([take(n + ".weight", (H, C)) for n in gate_up])
        out[b + "mlp.proj.weight"] = take(mlp + "down_proj.weight", (C, H))
        if cfg.has_bias("mlp"):
            out[b + "mlp.fc.bias"] = torch.cat([take(n + ".bias", (H,)) for n in gate_up])
            out[b + "mlp.proj.bias"] = take(mlp + "down_proj.bias", (C,))
    out["ln_f.weight"] = take("model.norm.weight", (C,))
    if cfg.tie_embeddings:
        head = hf.get("lm_head.weight")
        if head is not None and not torch.equal(head, out["wte.weight"]):
            raise UserError(
                f"model.init_from={folder}: config.json says tie_word_embeddings=true, but its "
                "lm_head.weight differs from the token embedding; fix tie_word_embeddings"
            )
        out["lm_head.weight"] = out["wte.weight"]
    else:
        out["lm_head.weight"] = take("lm_head.weight", (V, C))
    return out


def from_net(v: Variant, net: nn.Module) -> State:
    """Our net's weights under the family's names (merged LoRA layers included); a bias the
    family's layer has and ours lacks is written as zeros."""
    from bigmodel.nets.gpt import GPTConfig
    from bigmodel.pretrained.lora import merged_weight

    cfg = net.config
    theirs = GPTConfig(**{**vars(cfg), **net_config(v, hf_config(v, cfg), Path("config.json"))})
    q, kv = cfg.n_head * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head

    def bias(linear: nn.Linear) -> torch.Tensor:
        if linear.bias is not None:
            return linear.bias
        return torch.zeros(linear.out_features, dtype=linear.weight.dtype)

    out = {"model.embed_tokens.weight": net.wte.weight, "model.norm.weight": net.ln_f.weight}
    for i, block in enumerate(net.blocks):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = block.ln_1.weight
        out[p + "post_attention_layernorm.weight"] = block.ln_2.weight
        attn, mlp = p + "self_attn.", p + "mlp."
        names = ("q_proj", "k_proj", "v_proj")
        for n, w in zip(names, merged_weight(block.attn.qkv).split((q, kv, kv)), strict=True):
            out[f"{attn}{n}.weight"] = w
        if theirs.has_bias("qkv"):
            for n, b in zip(names, bias(block.attn.qkv).split((q, kv, kv)), strict=True):
                out[f"{attn}{n}.bias"] = b
        out[attn + "o_proj.weight"] = merged_weight(block.attn.proj)
        if theirs.has_bias("proj"):
            out[attn + "o_proj.bias"] = bias(block.attn.proj)
        if cfg.qk_norm:
            out[attn + "q_norm.weight"] = block.attn.q_norm.weight
            out[attn + "k_norm.weight"] = block.attn.k_norm.weight
        gate, up = merged_weight(block.mlp.fc).chunk(2)
        out[mlp + "gate_proj.weight"], out[mlp + "up_proj.weight"] = gate, up
        out[mlp + "down_proj.weight"] = merged_weight(block.mlp.proj)
        if theirs.has_bias("mlp"):
            out[mlp + "gate_proj.bias"], out[mlp + "up_proj.bias"] = bias(block.mlp.fc).chunk(2)
            out[mlp + "down_proj.bias"] = bias(block.mlp.proj)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = net.lm_head.weight
    return out


def hf_config(v: Variant, cfg: Any) -> dict[str, Any]:
    """config.json of the net (its switches the family cannot say are caught by the round trip
    in hf.check_expressible)."""
    out: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.layer_norm_epsilon,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    for rule, on in (
        (v.qkv_bias, cfg.has_bias("qkv")),
        (v.proj_bias, cfg.has_bias("proj")),
        (v.mlp_bias, cfg.has_bias("mlp")),
    ):
        if isinstance(rule, str):
            out[rule] = out.get(rule, False) or on
    if v.window == "mistral":
        out["sliding_window"] = cfg.sliding_window
    elif v.window == "qwen":
        out.update(use_sliding_window=False, sliding_window=None)
    return out


def modules(cfg: Any) -> dict[str, list[tuple[str, int, int]]]:
    """Our fused layers as the family's separate projections, by rows."""
    q, kv, H = cfg.n_head * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head, cfg.hidden
    return {
        "attn.qkv": [
            ("self_attn.q_proj", 0, q),
            ("self_attn.k_proj", q, q + kv),
            ("self_attn.v_proj", q + kv, q + 2 * kv),
        ],
        "attn.proj": [("self_attn.o_proj", 0, cfg.n_embd)],
        "mlp.fc": [("mlp.gate_proj", 0, H), ("mlp.up_proj", H, 2 * H)],
        "mlp.proj": [("mlp.down_proj", 0, cfg.n_embd)],
    }


def family(v: Variant) -> Family:
    return Family(
        v.model_type,
        v.architecture,
        lambda hf, path: net_config(v, hf, path),
        lambda state, cfg, folder: to_net(v, state, cfg, folder),
        lambda net: from_net(v, net),
        lambda cfg: hf_config(v, cfg),
        layer_prefix="model.layers.{i}.",
        modules=modules,
    )


LLAMA = Variant(
    "llama",
    "LlamaForCausalLM",
    qkv_bias="attention_bias",
    proj_bias="attention_bias",
    mlp_bias="mlp_bias",
    qk_norm=False,
)
FAMILY = family(LLAMA)
