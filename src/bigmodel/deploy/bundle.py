"""A trained model ready for inference: its net, what its inputs need, and where it came from.

A `Bundle` is loaded from a checkpoint written by train.py (`from_checkpoint`) or from a folder
written by export.py (`from_folder`); predict.py and serve.py take either. It holds only the net
(in eval mode, on the CPU) and plain data: the kind of model, the class names or tokenizer, the
preprocessing settings the training data used (image size and normalisation, sample rate and
clip length), and the card (data, metrics, the training command).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn as nn

from bigmodel.checkpoints import checkpoint_config, load_checkpoint, moved_base, resolve_ckpt_path
from bigmodel.data.tokenizers import tokenizer_from_dict
from bigmodel.errors import UserError
from bigmodel.pretrained import build_net as pretrained_net

log = logging.getLogger("bigmodel")

KINDS = ("image", "audio", "lm", "seq2seq", "regression")
FORMAT_VERSION = 1


@dataclass
class Bundle:
    """A net with everything inference needs besides the net (see the module docstring)."""

    kind: str
    """image, audio (classifiers), lm (language model), seq2seq (translation) or regression."""
    net: nn.Module
    """The plain torch net, eval mode, CPU."""
    model: dict
    """The resolved `model` config (its `net` builds the net again)."""
    data: dict
    """The resolved `data` config of the training run."""
    prep: dict
    """Input settings: image_size, channels, mean, std; sample_rate, num_samples; in_features."""
    classes: list[str] = field(default_factory=list)
    tokenizer: Any = None
    card: dict = field(default_factory=dict)
    """What the model card says: task, data, metrics, command, source."""
    folder: Path | None = None
    """The exported folder it was loaded from (None for a checkpoint)."""
    chat_template: dict | None = None
    """The chat template a language model was fine-tuned with (data=chat, data=preference):
    `ChatTemplate.to_dict()`; None when it had none."""

    @property
    def onnx_files(self) -> list[str]:
        """The ONNX graphs of the exported folder (none for a checkpoint)."""
        if self.folder is None:
            return []
        return sorted(p.name for p in self.folder.glob("*.onnx"))


def kind_of(task_name: str, data_target: str) -> str:
    """The kind of model from its task class name and its data module."""
    if task_name == "Classifier":
        return "audio" if "Audio" in data_target else "image"
    kinds = {
        "LanguageModel": "lm",
        "ChatModel": "lm",  # SFT and DPO checkpoints: their net is a language model
        "PreferenceModel": "lm",
        "Seq2Seq": "seq2seq",
        "Regressor": "regression",
    }
    if task_name not in kinds:
        raise UserError(
            f"a {task_name} cannot be deployed yet; export.py, predict.py and serve.py take "
            "classifiers, language models, translation models and regressors"
        )
    return kinds[task_name]


def build_net(net_cfg: dict) -> nn.Module:
    """The net from its resolved config (no weights yet)."""
    return hydra.utils.instantiate(net_cfg, _convert_="all")


def _prep(kind: str, net_cfg: dict, data_cfg: dict, data_state: dict) -> dict:
    if kind == "image":
        size = (
            data_state.get("image_size") or data_cfg.get("image_size") or net_cfg.get("image_size")
        )
        normalize = data_cfg.get("normalize", False)
        return {
            "image_size": int(size),
            "channels": int(net_cfg.get("in_channels") or data_cfg.get("channels") or 3),
            "mean": data_state.get("mean") if normalize else None,
            "std": data_state.get("std") if normalize else None,
        }
    if kind == "audio":
        rate = int(data_cfg["sample_rate"])
        return {"sample_rate": rate, "num_samples": int(round(data_cfg["clip_seconds"] * rate))}
    if kind == "regression":
        return {
            "in_features": int(net_cfg["in_features"]),
            "out_features": net_cfg.get("out_features"),
        }
    if kind == "lm":
        return {"block_size": int(net_cfg["block_size"]), "vocab_size": int(net_cfg["vocab_size"])}
    return {}  # seq2seq: the tokenizer and the decoding settings of `model`


def _card_from_run(path: Path, ckpt: dict, cfg: dict, task_name: str) -> dict:
    """Data, metrics and the training command, from the checkpoint and its run directory."""
    card: dict[str, Any] = {
        "task": task_name,
        "net": cfg["model"]["net"]["_target_"],
        "data": {k: v for k, v in cfg["data"].items() if not k.startswith("_")},
        "data_module": cfg["data"].get("_target_"),
        "source": str(path),
        "global_step": ckpt.get("global_step"),
        "metrics": {},
    }
    for key, state in (ckpt.get("callbacks") or {}).items():
        if key.startswith("ModelCheckpoint") and isinstance(state, dict):
            score = state.get("best_model_score")
            if state.get("monitor") and score is not None:
                card["metrics"][f"best {state['monitor']}"] = float(score)
    run = path.resolve().parent.parent  # <run>/checkpoints/<file>.ckpt
    metrics = run / "metrics.json"
    if metrics.is_file():
        try:
            saved = json.loads(metrics.read_text())
            card["metrics"].update(
                {k: v for k, v in saved.items() if k.split("/")[0] in ("val", "test")}
            )
        except (OSError, ValueError):
            pass
    overrides = run / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        from omegaconf import OmegaConf

        try:
            args = [str(a) for a in OmegaConf.load(overrides)]
            card["command"] = " ".join(["python train.py", *args])
        except Exception:  # a hand-edited file: the card simply says less
            pass
    return card


def from_checkpoint(
    ckpt_path: str, log_dir: str | None = None, init_from: str | None = None
) -> Bundle:
    """A checkpoint of train.py -> Bundle (weights loaded with weights_only=True); init_from:
    where its pretrained base model lives now, if it moved (`checkpoints.moved_base`)."""
    path = resolve_ckpt_path(ckpt_path, log_dir, "train")
    if path is None:
        raise UserError("give ckpt_path=PATH (a .ckpt written by train.py, or 'last')")
    ckpt = load_checkpoint(path)
    from omegaconf import OmegaConf

    saved = checkpoint_config(ckpt, path)
    moved_base(saved, init_from, path)
    cfg = OmegaConf.to_container(saved, resolve=True)
    task_name = (ckpt.get("bigmodel") or {}).get("task") or cfg["model"]["_target_"].split(".")[-1]
    data_target = cfg["data"].get("_target_", "")
    kind = kind_of(task_name, data_target)
    state = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:  # a LoRA checkpoint holds its adapters: the base comes from init_from, then merged
        net = pretrained_net(cfg["model"], state, build_net)
    except RuntimeError as e:
        raise UserError(f"{path} does not match its own model config: {str(e)[:300]}") from None
    data_state = ckpt.get(data_target.split(".")[-1]) or {}
    tokenizer = tokenizer_from_dict(data_state["tokenizer"]) if "tokenizer" in data_state else None
    return Bundle(
        kind=kind,
        net=net.eval(),
        model=cfg["model"],
        data=cfg["data"],
        prep=_prep(kind, cfg["model"]["net"], cfg["data"], data_state),
        classes=list(data_state.get("classes") or []),
        tokenizer=tokenizer,
        card=_card_from_run(Path(path), ckpt, cfg, task_name),
        chat_template=data_state.get("chat_template"),
    )


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"{path} is missing: {path.parent} is not a complete folder written by export.py "
            f"({what}); export it again"
        ) from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}); export the model again") from None


def from_folder(folder: str | Path) -> Bundle:
    """A folder written by export.py -> Bundle (the net's weights from model.safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model_dir={folder} is not a folder; pass a folder written by export.py")
    meta = read_json(folder / "config.json", "the model config")
    if meta.get("format_version") != FORMAT_VERSION or meta.get("kind") not in KINDS:
        raise UserError(
            f"{folder}/config.json was not written by this version of export.py; export again"
        )
    net = build_net(meta["model"]["net"])
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{weights} is missing; export the model again")
    try:
        load_model(net, str(weights), device="cpu")
    except (SafetensorError, RuntimeError, OSError) as e:
        raise UserError(f"{weights} does not load into its config's net: {str(e)[:300]}") from None
    tok = folder / "tokenizer.json"
    tokenizer = tokenizer_from_dict(read_json(tok, "the tokenizer")) if tok.is_file() else None
    classes_file = folder / "classes.json"
    classes = read_json(classes_file, "class names") if classes_file.is_file() else []
    return Bundle(
        kind=meta["kind"],
        net=net.eval(),
        model=meta["model"],
        data=meta["data"],
        prep=meta["prep"],
        classes=list(classes),
        tokenizer=tokenizer,
        card=meta.get("card", {}),
        folder=folder,
        chat_template=meta.get("chat_template"),
    )


def load_bundle(
    ckpt_path: str | None,
    model_dir: str | None,
    log_dir: str | None,
    init_from: str | None = None,
) -> Bundle:
    """Exactly one of ckpt_path= (a checkpoint) and model_dir= (an exported folder); init_from:
    where a checkpoint's pretrained base model lives now."""
    if bool(ckpt_path) == bool(model_dir):
        raise UserError(
            "give exactly one of ckpt_path=PATH (a .ckpt written by train.py, or 'last') and "
            "model_dir=DIR (a folder written by export.py)"
        )
    if init_from and not ckpt_path:
        raise UserError(
            f"model.init_from={init_from} reads a checkpoint's base model; an exported folder "
            "holds its weights merged: leave model.init_from out"
        )
    bundle = from_checkpoint(ckpt_path, log_dir, init_from) if ckpt_path else from_folder(model_dir)
    torch.set_grad_enabled(False)  # inference only, from here on
    return bundle
