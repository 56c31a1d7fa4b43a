"""Transfer learning: start a model from a bigmodel checkpoint of the same family.

Every weight is taken from the checkpoint except a head whose size follows the data (another
number of classes or outputs): that is re-initialised, with a log line saying so. Any other
difference (another width, depth, number of input channels, vocabulary) is refused with one line,
since the weights would not mean what they meant.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bigmodel.errors import UserError

log = logging.getLogger("bigmodel")

# net config fields that size an output head from the data
HEAD_SIZES = ("num_classes", "out_features")


def read_checkpoint(path: str | Path) -> dict:
    """A train.py checkpoint as plain data (`weights_only=True`), with its run config."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(
            f"model.init_from={path} is not a checkpoint torch can read as tensors and plain "
            f"data ({type(e).__name__}); pass a .ckpt written by train.py or a Hugging Face "
            "model folder"
        ) from None
    config = (ckpt.get("bigmodel") or {}).get("config") if isinstance(ckpt, dict) else None
    if not config or "state_dict" not in ckpt:
        raise UserError(
            f"model.init_from={path} carries no bigmodel run config or state_dict; pass a .ckpt "
            "written by train.py"
        )
    return ckpt


def check_family(saved: dict, model_cfg: Any, path: str | Path) -> None:
    """The checkpoint's net class is this run's (its task may differ: a language model's decoder
    goes on to chat fine-tuning, and that one's to preference tuning)."""
    net = model_cfg.get("net") or {}
    ours = (model_cfg.get("_target_"), net.get("_target_"))
    theirs = (saved.get("_target_"), (saved.get("net") or {}).get("_target_"))
    if ours[1] != theirs[1]:
        raise UserError(
            f"model.init_from={path} is a {theirs[1]} ({theirs[0]}), but this run builds a "
            f"{ours[1]} ({ours[0]}); start from a checkpoint of the same model= family"
        )
    if (saved.get("lora") or {}).get("rank"):
        raise UserError(
            f"model.init_from={path} holds LoRA adapters without their base weights; export it "
            "merged (python export.py ckpt_path=... format=hf out=DIR) and start from DIR"
        )


def size_like(net: Any, saved: dict, typed: set[str], path: str | Path) -> None:
    """Build the net as the checkpoint's: its `model.net` values replace this config's, except
    those given on the command line, the head sizes and the fields the data fills (`???`)."""
    from omegaconf import OmegaConf, open_dict

    taken = []
    with open_dict(net):
        for key, value in saved.items():
            if key.startswith("_") or key in HEAD_SIZES or key not in net:
                continue
            if OmegaConf.is_missing(net, key) or f"model.net.{key}" in typed:
                continue
            if net[key] != value:
                net[key] = value
                taken.append(f"{key}={value}")
    if taken:
        log.info(f"model.init_from: model.net as in {path}: {', '.join(taken)}")


def net_state(ckpt: dict) -> dict[str, torch.Tensor]:
    """The net's weights of a task checkpoint, under the net's own names."""
    return {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}


def load_transfer(net: nn.Module, ckpt: dict, model_cfg: Any, path: str | Path) -> None:
    """Load the checkpoint's net weights into `net`, re-initialising a head of another size."""
    saved = ckpt["bigmodel"]["config"]["model"]
    check_family(saved, model_cfg, path)
    saved_net, net_cfg = saved.get("net") or {}, model_cfg.get("net") or {}
    state, own = net_state(ckpt), net.state_dict()
    # a head follows the data: its first dimension is a head size that differs
    resized = {
        key: (saved_net[key], net_cfg.get(key))
        for key in HEAD_SIZES
        if key in saved_net and saved_net[key] != net_cfg.get(key)
    }
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which this model lacks"
        raise UserError(
            f"model.init_from={path} does not fit this model: the checkpoint {what}; build the "
            "model.net it was trained with"
        )
    keep = {}
    for key, value in state.items():
        mine = own[key]
        if value.shape == mine.shape:
            keep[key] = value
            continue
        head = next(
            (
                (name, old, new)
                for name, (old, new) in resized.items()
                if value.shape[0] == old
                and mine.shape[0] == new
                and value.shape[1:] == mine.shape[1:]
            ),
            None,
        )
        if head is None:
            raise UserError(
                f"model.init_from={path} does not fit this model: {key} is "
                f"{tuple(value.shape)} there and {tuple(mine.shape)} here; only a head sized by "
                f"{' or '.join(HEAD_SIZES)} is re-initialised, so build the model.net the "
                "checkpoint was trained with"
            )
        name, old, new = head
        log.info(
            f"model.init_from: {key} is re-initialised ({name} {old} in the checkpoint, {new} "
            f"here: shape {tuple(value.shape)} -> {tuple(mine.shape)})"
        )
        keep[key] = mine
    net.load_state_dict(keep, strict=True)
    log.info(f"model.init_from: {len(state)} tensors from {path}")


def saved_tokenizer(ckpt: dict) -> dict | None:
    """The tokenizer a checkpoint's data module saved (the data of a transferred language or
    translation model must be tokenized with it)."""
    for key, value in ckpt.items():
        if key.endswith("DataModule") and isinstance(value, dict) and "tokenizer" in value:
            return value["tokenizer"]
    return None
