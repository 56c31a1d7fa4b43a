"""Starting from pretrained weights: `model.init_from` and `model.lora`.

`model.init_from` is a Hugging Face folder of a supported decoder family (hf.py: the adapter of
its config.json's model_type shapes the net, maps its weights in, and the text is tokenized with
its tokenizer) or a train.py checkpoint of the same model family (transfer.py).
`model.lora.rank > 0` freezes the net and trains LoRA adapters (lora.py). The task classes know
none of this: the runner calls

- `prepare(cfg)` before the data module is built (net sizes, tokenizer folder, early checks),
- `prepare_data(cfg, datamodule)` before its setup (a checkpoint's tokenizer),
- `task_config(cfg.model)` for what the task class takes, and `build(cfg.model, task)` after it is
  built (weights, adapters); `restoring=True` where a checkpoint's own weights follow.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch.nn as nn
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

from bigmodel.errors import UserError
from bigmodel.pretrained.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    count_trainable,
    merged_weight,
)

log = logging.getLogger("bigmodel")

OPTIONS = ("init_from", "lora")
GPT_TARGET = "bigmodel.nets.GPT"


def task_config(model: DictConfig) -> DictConfig:
    """`model` without the keys of this package: what the task class takes (a shallow copy that
    still resolves interpolations against the whole config)."""
    if not any(k in model for k in OPTIONS):
        return model
    out = copy.copy(model)
    with read_write(out), open_dict(out):
        for key in OPTIONS:
            out.pop(key, None)
    return out


def lora_config(model: Any) -> LoRAConfig | None:
    """`model.lora` as a LoRAConfig; None when LoRA is off."""
    lora = model.get("lora") if model is not None else None
    if not lora or not lora.get("rank"):
        return None
    values = OmegaConf.to_container(lora) if isinstance(lora, DictConfig) else dict(lora)
    known = {"rank", "alpha", "dropout", "targets"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(
            f"model.lora.{unknown[0]} is not a LoRA setting; they are {', '.join(sorted(known))}"
        )
    if isinstance(values.get("targets"), ListConfig):
        values["targets"] = list(values["targets"])
    return LoRAConfig(**values)


def _net_target(model: DictConfig) -> str:
    return str((model.get("net") or {}).get("_target_", ""))


# ------------------------------------------------------------------------------- the config
def prepare(cfg: DictConfig) -> None:
    """Check `model.init_from` and `model.lora` before anything loads; for a Hugging Face
    folder, size `model.net` from its config.json and point `data.tokenizer` at it."""
    model = cfg.model
    lora = lora_config(model)
    init = model.get("init_from")
    if lora is not None:
        if _net_target(model) != GPT_TARGET:
            raise UserError(
                f"model.lora.rank={lora.rank}: LoRA adapts the decoder only (model=gpt, llama "
                f"and their presets), and this model's net is {_net_target(model)}; fine-tune it "
                "fully (model.lora.rank=0) or start from its checkpoint with model.init_from=CKPT"
            )
        if not init:
            from bigmodel.pretrained.hf import SUPPORTED

            raise UserError(
                f"model.lora.rank={lora.rank} trains adapters on pretrained weights: set "
                f"model.init_from to a Hugging Face folder ({SUPPORTED}) or a .ckpt of train.py"
            )
    if not init:
        return
    path = os.path.abspath(os.path.expanduser(str(init)))
    with open_dict(model):
        model.init_from = path  # absolute: eval.py finds it from anywhere
    if not os.path.exists(path):
        raise UserError(
            f"model.init_from={init} does not exist; pass a Hugging Face model folder "
            "(downloaded elsewhere: config.json, model.safetensors, tokenizer.json) or a .ckpt "
            "of train.py"
        )
    if os.path.isdir(path):
        _prepare_hf(cfg, path)
    else:
        from bigmodel.config_checks import typed_keys
        from bigmodel.pretrained.transfer import check_family, read_checkpoint, size_like

        saved = read_checkpoint(path)["bigmodel"]["config"]["model"]
        check_family(saved, model, path)
        size_like(model.net, saved.get("net") or {}, typed_keys(), path)


def _prepare_hf(cfg: DictConfig, init: str) -> None:
    from bigmodel.config_checks import typed_keys
    from bigmodel.pretrained import hf, hf_files
    from bigmodel.pretrained.peft_format import base_folder

    # a PEFT adapter folder: the net, its weights and the tokenizer are its base model's
    base = base_folder(init)
    folder = str(base) if base is not None else init
    if _net_target(cfg.model) != GPT_TARGET:
        raise UserError(
            f"model.init_from={folder} is a folder, which means a Hugging Face model; this "
            f"model's net is {_net_target(cfg.model)}: use experiment=finetune, or a .ckpt of "
            "this family"
        )
    sizes = hf.net_config(folder)
    hf_files.weights_files(folder)  # missing weights: say so now, not after the data is read
    typed, net = typed_keys(), cfg.model.net
    with open_dict(net):
        for key, value in sizes.items():
            ours = None if OmegaConf.is_missing(net, key) else net.get(key)
            if f"model.net.{key}" in typed and ours != value:
                if key == "block_size" and isinstance(ours, int) and 0 < ours <= value:
                    continue  # a shorter context: the first positions of the table
                raise UserError(
                    f"model.net.{key}={ours} conflicts with {folder}/config.json ({key}={value}); "
                    "leave it out: the net is sized from the pretrained model"
                    + (
                        f" (a shorter context, up to {value}, may be set)"
                        if key == "block_size"
                        else ""
                    )
                )
            net[key] = value
    hf_files.check_tokenizer(folder, sizes["vocab_size"])
    data = cfg.get("data")
    if data is not None and "tokenizer" in data:
        if "data.tokenizer" in typed and os.path.abspath(str(data.tokenizer)) != folder:
            raise UserError(
                f"data.tokenizer={data.tokenizer}: a pretrained model reads the ids of its own "
                f"tokenizer, which model.init_from={folder} sets; leave data.tokenizer out"
            )
        with open_dict(data):
            data.tokenizer = folder


def prepare_data(cfg: DictConfig, datamodule: Any) -> None:
    """A checkpoint to transfer from: its data's tokenizer tokenizes this data (same ids)."""
    init = cfg.model.get("init_from")
    if not init or not os.path.isfile(init) or not hasattr(datamodule, "load_state_dict"):
        return
    from bigmodel.pretrained.transfer import read_checkpoint, saved_tokenizer

    ckpt = read_checkpoint(init)
    tokenizer = saved_tokenizer(ckpt)
    if tokenizer is not None and hasattr(datamodule, "tokenizer"):
        state = {"tokenizer": tokenizer}
        for key, value in ckpt.items():  # a chat template travels with its tokenizer
            if key.endswith("DataModule") and isinstance(value, dict) and "chat_template" in value:
                state["chat_template"] = value["chat_template"]
        datamodule.load_state_dict(state)


# -------------------------------------------------------------------------------- the net
def build(model: DictConfig | dict, task: nn.Module, restoring: bool = False) -> None:
    """Load `model.init_from` into the task's net and put LoRA adapters on it.

    restoring: a checkpoint's weights are loaded next; only the frozen base of a LoRA net, which
    the checkpoint leaves out, is read from `init_from`.
    """
    load_base(model, task.net, restoring)
    if lora_config(model) is not None:
        # the checkpoints of an adapted net hold the adapters alone. Lightning's FSDP2 loader
        # compares key names itself (not through the net's load hooks): let it pass the frozen
        # base, which model.init_from has loaded; check_same_model still checks a resumed one
        task.strict_loading = False


def load_base(model: DictConfig | dict, net: nn.Module, restoring: bool = False) -> None:
    init, lora = model.get("init_from"), lora_config(model)
    if not init or (restoring and lora is None):
        return
    if restoring and not os.path.exists(init):
        raise UserError(
            f"this checkpoint holds LoRA adapters only; their base model.init_from={init} is "
            "gone: put the pretrained model back there, or give its new place with "
            "model.init_from=DIR"
        )
    if os.path.isdir(init):
        from bigmodel.pretrained.hf import load_weights
        from bigmodel.pretrained.peft_format import base_folder, merge_peft

        base = base_folder(init)  # a PEFT adapter folder: its base, the adapters merged in
        load_weights(net, base or init)
        merged = merge_peft(net, init) if base is not None else 0
        if not restoring:
            log.info(
                f"model.init_from: {net.config.family} weights from {base or init}"
                + (f", with the PEFT adapters of {init} merged ({merged} modules)" if base else "")
            )
    else:
        from bigmodel.pretrained.transfer import load_transfer, read_checkpoint

        load_transfer(net, read_checkpoint(init), model, init)
    if lora is not None:
        adapted = apply_lora(net, lora)
        trainable, total = count_trainable(net)
        if not restoring:
            log.info(
                f"LoRA rank {lora.rank} (alpha {lora.alpha:g}) on {len(adapted)} layers "
                f"({', '.join(lora.targets)}): {trainable:,} trainable parameters of "
                f"{total:,} ({100 * trainable / total:.2f} %)"
            )


def merge_lora(net: nn.Module) -> nn.Module:
    """Replace each LoRA layer of `net` by a plain Linear holding the merged weight (in place)."""
    for name, module in list(net.named_modules()):
        if isinstance(module, LoRALinear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.to(module.weight.device, module.weight.dtype)
            plain.weight.data.copy_(merged_weight(module).detach())
            if module.bias is not None:
                plain.bias.data.copy_(module.bias.detach())
            parent, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, attr, plain)
    return net


def build_net(model: dict, net_state: dict, build: Any) -> nn.Module:
    """A checkpoint's net for inference: `build(model["net"])` makes it, the LoRA base comes
    from `init_from`, `net_state` (the net's keys of the checkpoint) is loaded and adapters are
    merged: a plain net."""
    net = build(model["net"])
    load_base(model, net, restoring=True)
    net.load_state_dict(net_state)
    return merge_lora(net)
