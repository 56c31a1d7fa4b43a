"""The files of a Hugging Face model folder, read and written without `transformers`: config.json,
the weights (model.safetensors, a sharded index of them, or pytorch_model.bin read with
`weights_only=True`) and the tokenizer. What the tensors mean is each family's adapter's business
(hf_gpt2.py, hf_llama.py, ...); the registry that picks the adapter is hf.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bigmodel.data.tokenizers import BPETokenizer, CharTokenizer
from bigmodel.errors import UserError

SAFETENSORS, SHARDED, PICKLE = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
)
# a pretrained folder's tokenizer files, copied as they are into an exported folder (the special
# tokens and chat template stay the source model's)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def read_json(folder: str | Path, not_ours: str) -> dict[str, Any]:
    """The folder's `config.json`; `not_ours` ends the message when it is missing or not JSON."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(
            f"model.init_from={folder} has no config.json, so it is no Hugging Face model "
            f"folder; {not_ours}"
        )
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not JSON ({e}); {not_ours}") from None
    if not isinstance(hf, dict):
        raise UserError(f"{path} holds a {type(hf).__name__}, not a model config; {not_ours}")
    return hf


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


def taker(
    hf: dict[str, torch.Tensor], folder: str | Path
) -> Callable[[str, tuple[int, ...]], torch.Tensor]:
    """`take(name, shape)`: the folder's tensor `name`, refused in one line when it is missing
    (an incomplete checkpoint) or of another shape (weights of another model)."""

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in hf:
            raise UserError(
                f"the weights of model.init_from={folder} lack {name}; it is not a complete "
                "checkpoint of the model its config.json describes"
            )
        t = hf[name]
        if tuple(t.shape) != shape:
            raise UserError(
                f"{name} in model.init_from={folder} has shape {tuple(t.shape)}, but its "
                f"config.json makes it {shape}; the weights are of another model"
            )
        return t

    return take


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


def copy_tokenizer(source: Path, out_dir: Path) -> bool:
    """Copy a pretrained folder's tokenizer files (special tokens and chat template included);
    False when it has none left."""
    names = [n for n in TOKENIZER_FILES if (source / n).is_file()]
    if "tokenizer.json" not in names and "vocab.json" not in names:
        return False
    for name in names:
        shutil.copyfile(source / name, out_dir / name)
    return True


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


def end_of_text(tokenizer: Any) -> int | None:
    """The id of GPT-2's `<|endoftext|>` in a BPE tokenizer (bos and eos of exported GPT-2s)."""
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.token_to_id("<|endoftext|>")
    return None
