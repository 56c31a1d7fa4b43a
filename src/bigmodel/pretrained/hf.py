"""Hugging Face checkpoints in and out of our decoder, through one adapter per model family.

`FAMILIES` maps a config.json `model_type` to its `Family`, from the adapter modules `ADAPTERS`
names (hf_gpt2.py, hf_llama.py, hf_qwen2.py, hf_qwen3.py, hf_mistral.py); nothing else names a
family. Adding one is a module with a `FAMILY` and its name in `ADAPTERS` (docs/extending.md).

In: `net_config(folder)` gives the `model.net` fields (bigmodel.nets.gpt.GPTConfig) that compute
what the folder's model computes (a field of config.json that would change the computation and
that our decoder does not have is refused, naming it); `load_weights(net, folder)` fills the
net. Out: `export_hf(task, out_dir)` writes config.json, model.safetensors and the tokenizer in
the layout of the net's `family`, which `AutoModelForCausalLM.from_pretrained` loads as the same
architecture class.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch.nn as nn

from bigmodel.errors import UserError
from bigmodel.files import readable_as_any_file
from bigmodel.pretrained import hf_files
from bigmodel.pretrained.adapter import Family

# The adapters, one module of bigmodel.pretrained each, whose FAMILY names its model_type
ADAPTERS = (
    "hf_gpt2",
    "hf_llama",
    "hf_qwen2",
    "hf_qwen3",
    "hf_mistral",
)


def _families() -> dict[str, Family]:
    modules = [importlib.import_module(f"bigmodel.pretrained.{name}") for name in ADAPTERS]
    return {m.FAMILY.model_type: m.FAMILY for m in modules}


FAMILIES: dict[str, Family] = _families()
SUPPORTED = ", ".join(FAMILIES)
NOT_OURS = (
    f"model.init_from takes a Hugging Face folder of a decoder ({SUPPORTED}: config.json with "
    f"its model_type, {hf_files.SAFETENSORS} or {hf_files.PICKLE}) or a .ckpt written by train.py"
)


def family_of(folder: str | Path) -> tuple[Family, dict[str, Any]]:
    """The folder's adapter and its config.json; an unsupported model_type lists ours."""
    hf = hf_files.read_json(folder, NOT_OURS)
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise UserError(
            f"model.init_from={folder} holds a {kind} model ({Path(folder) / 'config.json'}: "
            f"model_type={kind}), which is not supported; the supported model types are "
            f"{SUPPORTED}"
        )
    return FAMILIES[kind], hf


def net_config(folder: str | Path) -> dict[str, Any]:
    """`model.net` fields that size and shape our decoder as the folder's model."""
    family, hf = family_of(folder)
    return {**family.net_config(hf, Path(folder) / "config.json"), "family": family.model_type}


def load_weights(net: nn.Module, folder: str | Path) -> None:
    """Fill `net` (built from `net_config(folder)`) with the folder's weights."""
    family, _ = family_of(folder)
    state = family.to_net(hf_files.read_weights(folder), net.config, Path(folder))
    # load_state_dict copies into the net's own tensors, converting fp16 / bf16 files to its dtype
    net.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)


def check_tokenizer(folder: str | Path, vocab_size: int):
    return hf_files.check_tokenizer(folder, vocab_size)


# ------------------------------------------------------------------------------------- out
def computed_fields(cfg: Any) -> dict[str, Any]:
    """What the net computes, each setting resolved (null widths and biases to their values),
    by the names of `model.net` (`norm_bias`: the LayerNorms' biases, which `bias` sets)."""
    from bigmodel.nets.gpt import GPTConfig

    c = GPTConfig(**vars(cfg))
    plain = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "layer_norm_epsilon")
    out = {k: getattr(c, k) for k in (*plain, "norm", "positions", "mlp", "qk_norm")}
    out.update(
        tie_embeddings=c.tie_embeddings,
        n_kv_head=c.kv_heads,
        head_dim=c.dim_per_head,
        intermediate_size=c.hidden,
        qkv_bias=c.has_bias("qkv"),
        proj_bias=c.has_bias("proj"),
        mlp_bias=c.has_bias("mlp"),
        norm_bias=c.bias and c.norm == "layernorm",
        sliding_window=c.sliding_window,
    )
    if c.positions == "rotary":
        scaling = dict(c.rope_scaling or {})
        kind = scaling.pop("rope_type", scaling.pop("type", "default"))
        out["rope_theta"] = float(c.rope_theta)
        out["rope_scaling"] = None if kind == "default" else {"rope_type": kind, **scaling}
    return out


BIASES = ("qkv_bias", "proj_bias", "mlp_bias", "norm_bias")


def family_for(net: nn.Module) -> Family:
    cfg = getattr(net, "config", None)
    name = getattr(cfg, "family", None)
    if name not in FAMILIES:
        raise UserError(
            f"format=hf writes decoders (bigmodel.nets.GPT) of the families {SUPPORTED}; this "
            f"checkpoint's net is a {type(net).__name__}"
            + (f" of family {name}" if name else "")
            + ": use format=safetensors or onnx"
        )
    return FAMILIES[name]


def check_expressible(family: Family, cfg: Any) -> dict[str, Any]:
    """config.json for the net, refused in one line when the family's transformers class would
    compute something else (a setting its config.json cannot say)."""
    from bigmodel.nets.gpt import GPTConfig

    hf = family.hf_config(cfg)
    fields = family.net_config(hf, Path("config.json"))
    back = computed_fields(GPTConfig(**{**vars(cfg), **fields}))
    for key, value in computed_fields(cfg).items():
        theirs = back.get(key)
        if theirs == value or (key == "block_size" and theirs >= value):
            continue
        if key in BIASES and not value:
            continue  # a bias the net lacks is written as zeros: the same function
        name = "bias" if key == "norm_bias" else key
        raise UserError(
            f"model.net.{name}={value} cannot be written as a Hugging Face {family.model_type} "
            f"model ({family.architecture} computes {key}={theirs}); export it with "
            "format=safetensors, or set model.net.family to a family that has it"
        )
    return hf


def export_hf(task: nn.Module, out_dir: Path, tokenizer: Any = None) -> None:
    """Write `out_dir` in the Hugging Face layout of the net's family: config.json,
    model.safetensors and the tokenizer (the pretrained folder's files when the run tokenized
    with one, special tokens and chat template included; else ours as tokenizer.json).

    task: a restored language model (or its net); LoRA adapters are merged in.
    tokenizer: the data's tokenizer; None takes the pretrained folder the run tokenized with.
    """
    from safetensors.torch import save_file

    net = getattr(task, "net", task)
    family = family_for(net)
    config = check_expressible(family, net.config)
    run = getattr(task, "run_config", None) or {}
    source = ((run.get("data") or {}).get("tokenizer")) if isinstance(run, dict) else None
    source = Path(source) if isinstance(source, str) and Path(source).is_dir() else None
    if tokenizer is None and source is None:
        raise UserError(
            "format=hf needs the tokenizer of the run: pass the data module's "
            "(export_hf(task, out, tokenizer=...))"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in family.from_net(net).items()}
    save_file(state, str(out_dir / hf_files.SAFETENSORS), metadata={"format": "pt"})
    readable_as_any_file(out_dir / hf_files.SAFETENSORS)
    eos = hf_files.end_of_text(tokenizer)
    ids = {"bos_token_id": eos, "eos_token_id": eos}
    init = (run.get("model") or {}).get("init_from") if isinstance(run, dict) else None
    if isinstance(init, str) and (Path(init) / "adapter_config.json").is_file():  # PEFT: its base
        init = json.loads((Path(init) / "adapter_config.json").read_text()).get(
            "base_model_name_or_path"
        )
    if isinstance(init, str) and (Path(init) / "config.json").is_file():
        theirs = json.loads((Path(init) / "config.json").read_text(encoding="utf-8"))
        ids = {k: theirs.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        **config,
        **ids,
        "torch_dtype": "float32",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if source is None or not hf_files.copy_tokenizer(source, out_dir):
        hf_files.write_tokenizer(tokenizer, out_dir, net.config.block_size)
