"""Hugging Face GPT-2 folders in and out of our GPT, without `transformers`.

In: `config.json` sizes the net (`gpt_config`), `model.safetensors` (or a sharded index of them)
or `pytorch_model.bin` (read with `weights_only=True`) fills it (`load_weights`). Out:
`export_hf` writes the folder back, which `GPT2LMHeadModel.from_pretrained` and the HF tokenizer
load.

The two layouts differ in three ways. GPT-2's projections are `Conv1D` layers, whose weight is
stored (in, out): the transpose of `nn.Linear`'s (out, in). Its head is tied to the token
embedding and left out of the file. It always has biases, so a net trained without them is
written with zero biases (the same function).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bigmodel.data.tokenizers import BPETokenizer, CharTokenizer
from bigmodel.errors import UserError
from bigmodel.files import readable_as_any_file
from bigmodel.nets.gpt import GPT

SAFETENSORS, SHARDED, PICKLE = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
)
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
NOT_GPT2 = (
    "model.init_from takes a Hugging Face GPT-2 folder (config.json with model_type gpt2, and "
    f"{SAFETENSORS} or {PICKLE}) or a .ckpt written by train.py"
)


def read_config(folder: str | Path) -> dict[str, Any]:
    """The folder's `config.json`, checked to describe a GPT-2 our GPT computes exactly."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(
            f"model.init_from={folder} has no config.json, so it is no GPT-2 folder; {NOT_GPT2}"
        )
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not JSON ({e}); {NOT_GPT2}") from None
    if not isinstance(hf, dict) or hf.get("model_type") != "gpt2":
        kind = hf.get("model_type") if isinstance(hf, dict) else type(hf).__name__
        raise UserError(
            f"model.init_from={folder} holds a {kind} model, not GPT-2 ({path}); {NOT_GPT2}"
        )
    act = hf.get("activation_function", "gelu_new")
    if act not in _TANH_GELU:
        raise UserError(
            f"{path}: activation_function={act} is not GPT-2's tanh GELU "
            f"({', '.join(_TANH_GELU)}); our GPT computes only that"
        )
    n_embd = hf.get("n_embd", 768)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise UserError(
            f"{path}: n_inner={hf['n_inner']} differs from 4 x n_embd ({4 * n_embd}), the only "
            "MLP width our GPT has"
        )
    for key, value in _FIXED.items():
        if hf.get(key, value) != value:
            raise UserError(
                f"{path}: {key}={hf[key]} is not supported (our GPT computes {key}={value})"
            )
    return hf


def gpt_config(folder: str | Path) -> dict[str, Any]:
    """`model.net` fields (bigmodel.nets.gpt.GPTConfig) that size the net like the folder's."""
    hf = read_config(folder)
    return {
        "vocab_size": int(hf.get("vocab_size", 50257)),
        "block_size": int(hf.get("n_positions", hf.get("n_ctx", 1024))),
        "n_layer": int(hf.get("n_layer", 12)),
        "n_head": int(hf.get("n_head", 12)),
        "n_embd": int(hf.get("n_embd", 768)),
        "bias": True,
        "layer_norm_epsilon": float(hf.get("layer_norm_epsilon", 1e-5)),
    }


def weights_files(folder: str | Path) -> list[Path]:
    """The weight files of the folder, in the order they load."""
    folder = Path(folder)
    if (folder / SAFETENSORS).is_file():
        return [folder / SAFETENSORS]
    if (folder / SHARDED).is_file():
        index = json.loads((folder / SHARDED).read_text(encoding="utf-8"))
        files = [folder / name for name in sorted(set(index.get("weight_map", {}).values()))]
        missing = [f.name for f in files if not f.is_file()]
        if not files or missing:
            raise UserError(
                f"{folder / SHARDED} lists shards the folder lacks "
                f"({', '.join(missing) or 'none listed'}); download them too"
            )
        return files
    if (folder / PICKLE).is_file():
        return [folder / PICKLE]
    raise UserError(
        f"model.init_from={folder} has config.json but no weights: put {SAFETENSORS} or {PICKLE} "
        "in it (downloaded with the model)"
    )


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weight files, on the CPU; pickles with `weights_only=True`."""
    state: dict[str, torch.Tensor] = {}
    for f in weights_files(folder):
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                state.update(load_file(str(f), device="cpu"))
            else:
                state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            # torch's own message advises weights_only=False (running the file's code): not relayed
            raise UserError(
                f"{f} is not a readable weights file ({type(e).__name__}); download it again"
            ) from None
    return state


def to_gpt_state(
    hf: dict[str, torch.Tensor], net: GPT, folder: str | Path
) -> dict[str, torch.Tensor]:
    """GPT-2's tensors under our names and layout, for `net.load_state_dict`."""
    # transformers saves under `transformer.`; OpenAI's original files have no prefix
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    cfg = net.config
    C, T = cfg.n_embd, cfg.block_size

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in hf:
            raise UserError(
                f"the weights of model.init_from={folder} lack {name}; it is not a complete GPT-2 "
                "checkpoint"
            )
        t = hf[name]
        if tuple(t.shape) != shape:
            raise UserError(
                f"{name} in model.init_from={folder} has shape {tuple(t.shape)}, but its "
                f"config.json makes it {shape}; the weights are of another model"
            )
        return t

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
    for i in range(cfg.n_layer):
        for ours, theirs in _NORMS.items():
            for p in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{p}"] = take(f"h.{i}.{theirs}.{p}", (C,))
        for ours, theirs in _LINEARS.items():
            linear = net.get_submodule(f"blocks.{i}.{ours}")
            o, n = linear.out_features, linear.in_features
            w = take(f"h.{i}.{theirs}.weight", (n, o) if conv1d else (o, n))
            out[f"blocks.{i}.{ours}.weight"] = w.t() if conv1d else w
            out[f"blocks.{i}.{ours}.bias"] = take(f"h.{i}.{theirs}.bias", (o,))
    head = hf.get("lm_head.weight")
    if head is not None and not torch.equal(head, out["wte.weight"]):
        raise UserError(
            f"model.init_from={folder} has an output head of its own (not tied to the token "
            "embedding); our GPT ties them"
        )
    out["lm_head.weight"] = out["wte.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def load_weights(net: GPT, folder: str | Path) -> None:
    """Fill `net` (sized by `gpt_config(folder)`) with the folder's GPT-2 weights."""
    # load_state_dict copies into the net's own tensors, converting fp16 / bf16 files to its dtype
    net.load_state_dict(to_gpt_state(read_weights(folder), net, folder), strict=True)


def check_tokenizer(folder: str | Path, vocab_size: int) -> BPETokenizer:
    """The folder's tokenizer, refused when it has ids the embedding has no row for."""
    tok = BPETokenizer.from_folder(folder)
    if tok.vocab_size > vocab_size:
        raise UserError(
            f"the tokenizer of model.init_from={folder} has {tok.vocab_size} tokens, but its "
            f"config.json has vocab_size={vocab_size}: they belong to different models; put the "
            "model's own tokenizer files beside its weights"
        )
    return tok


# ------------------------------------------------------------------------------------- out
def hf_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """Our GPT's weights in GPT-2's names and Conv1D layout (merged LoRA layers included)."""
    from bigmodel.pretrained.lora import merged_weight

    cfg = net.config
    C = cfg.n_embd
    zeros = torch.zeros

    def norm(m: nn.LayerNorm, name: str) -> dict[str, torch.Tensor]:
        b = m.bias if m.bias is not None else zeros(C, dtype=m.weight.dtype)
        return {f"{name}.weight": m.weight, f"{name}.bias": b}

    out = {"transformer.wte.weight": net.wte.weight, "transformer.wpe.weight": net.wpe.weight}
    out.update(norm(net.ln_f, "transformer.ln_f"))
    for i, block in enumerate(net.blocks):
        for ours, theirs in _NORMS.items():
            out.update(norm(getattr(block, ours), f"transformer.h.{i}.{theirs}"))
        for ours, theirs in _LINEARS.items():
            linear = block.get_submodule(ours)
            w = merged_weight(linear)  # (out, in)
            b = linear.bias if linear.bias is not None else zeros(w.shape[0], dtype=w.dtype)
            out[f"transformer.h.{i}.{theirs}.weight"] = w.t()  # Conv1D: (in, out)
            out[f"transformer.h.{i}.{theirs}.bias"] = b
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def hf_config(net: nn.Module, tokenizer: Any = None) -> dict[str, Any]:
    cfg = net.config
    eos = None
    if isinstance(tokenizer, BPETokenizer):
        eos = tokenizer.token_to_id("<|endoftext|>")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }


def export_hf(task: nn.Module, out_dir: Path, tokenizer: Any = None) -> None:
    """Write `out_dir` in the Hugging Face GPT-2 layout: config.json, model.safetensors and the
    tokenizer (tokenizer.json, plus vocab.json + merges.txt for BPE).

    task: a restored language model whose net is our GPT (LoRA adapters are merged in).
    tokenizer: the data's tokenizer; None takes the pretrained folder the run tokenized with
    (`data.tokenizer` of the run config).
    """
    from safetensors.torch import save_file

    net = getattr(task, "net", task)
    if not isinstance(net, GPT):
        raise UserError(
            f"format=hf writes GPT-2 folders: this checkpoint's net is a {type(net).__name__}, "
            "not a GPT; use format=safetensors or onnx"
        )
    if tokenizer is None:
        data = (getattr(task, "run_config", None) or {}).get("data") or {}
        kind = data.get("tokenizer")
        if not (isinstance(kind, str) and Path(kind).is_dir()):
            raise UserError(
                "format=hf needs the tokenizer of the run: pass the data module's "
                "(export_hf(task, out, tokenizer=...))"
            )
        tokenizer = BPETokenizer.from_folder(kind)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(hf_state(net), str(out_dir / SAFETENSORS), metadata={"format": "pt"})
    readable_as_any_file(out_dir / SAFETENSORS)
    (out_dir / "config.json").write_text(json.dumps(hf_config(net, tokenizer), indent=2) + "\n")
    write_tokenizer(tokenizer, out_dir, net.config.block_size)


def write_tokenizer(tokenizer: Any, out_dir: Path, max_length: int) -> None:
    """tokenizer.json (+ tokenizer_config.json) that `AutoTokenizer.from_pretrained` reads."""
    special: dict[str, str] = {}
    if isinstance(tokenizer, BPETokenizer):
        tok = tokenizer.tok
        if tok.token_to_id("<|endoftext|>") is not None:
            special = {k: "<|endoftext|>" for k in ("bos_token", "eos_token", "unk_token")}
        if type(tok.model).__name__ == "BPE":
            tok.model.save(str(out_dir))  # vocab.json + merges.txt, for GPT2Tokenizer
    elif isinstance(tokenizer, CharTokenizer):
        tok = char_tokenizer(tokenizer)
        if tokenizer.unk is not None:
            special = {"unk_token": tokenizer.unk}
    else:
        raise UserError(
            f"format=hf cannot write a {type(tokenizer).__name__}; it writes BPE and char "
            "tokenizers"
        )
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        **special,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def char_tokenizer(tokenizer: CharTokenizer):
    """Our char vocabulary as an HF `tokenizers.Tokenizer`: one token per character, same ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(tokenizer.chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=tokenizer.unk or tokenizer.chars[0]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok
