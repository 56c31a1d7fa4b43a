"""export.py: a checkpoint -> a self-contained folder (safetensors, ONNX, or Hugging Face).

`format=safetensors` writes the weights, configs, tokenizer or class names and the model card
(bigmodel.deploy.folder); `format=onnx` adds the ONNX graphs with their parity against PyTorch
(bigmodel.deploy.onnx) and, with `quantize=int8`, the int8 graphs scored next to fp32 on the
checkpoint's held-out data; `format=hf` (decoders: GPT-2, Llama, Qwen2, Qwen3, Mistral) writes a
Hugging Face transformers folder of the net's family (bigmodel.pretrained.hf); `format=peft` the
LoRA adapters of a checkpoint in the PEFT format, over its `model.init_from` folder.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from bigmodel.errors import UserError, reports_user_errors

if TYPE_CHECKING:
    from bigmodel.deploy.bundle import Bundle

log = logging.getLogger("bigmodel")

FORMATS = ("safetensors", "onnx", "hf", "peft")
QUANTIZE = (None, "int8")


def _check(cfg: DictConfig) -> None:
    if cfg.format not in FORMATS:
        raise UserError(f"format={cfg.format} is not one of {', '.join(FORMATS)}")
    if cfg.get("quantize") not in QUANTIZE:
        raise UserError(f"quantize={cfg.quantize} is not one of int8, null")
    if cfg.get("quantize") and cfg.format != "onnx":
        raise UserError("quantize=int8 quantizes the ONNX graphs: add format=onnx")
    if not cfg.get("out"):
        raise UserError("give out=DIR, the folder to write")
    out = Path(cfg.out)
    if out.is_dir() and any(out.iterdir()) and not cfg.get("overwrite"):
        raise UserError(
            f"out={out} already holds files; choose another folder or pass overwrite=true"
        )


def _fill(bundle: Bundle, cfg: DictConfig, name: str, tmp: Path) -> None:
    from bigmodel.deploy.folder import write_meta, write_weights

    write_weights(bundle, tmp)
    rows: list[dict] = []
    scores: dict = {}
    if cfg.format == "onnx":
        from bigmodel.deploy.onnx import export_onnx

        rows = export_onnx(bundle, tmp, cfg.get("quantize"))
        if cfg.get("quantize") and cfg.get("eval_batches", 0) > 0:
            from bigmodel.checkpoints import restore
            from bigmodel.deploy.scoring import score_engines

            _, datamodule, _ = restore(
                bundle.card["source"], init_from=bundle.model.get("init_from")
            )
            scores = score_engines(
                dataclasses.replace(bundle, folder=tmp), datamodule, int(cfg.eval_batches)
            )
            for engine, vals in scores["engines"].items():
                log.info(f"{engine}: " + ", ".join(f"{k}={v:.4g}" for k, v in vals.items()))
    write_meta(bundle, tmp, cfg.format, rows, scores, name)


def _export_hf(cfg: DictConfig, bundle: Bundle, out: Path) -> None:
    if bundle.kind != "lm":
        raise UserError(
            f"format=hf writes Hugging Face folders of language models; this checkpoint is a "
            f"{bundle.kind} model: use format=safetensors or format=onnx"
        )
    try:
        hf = importlib.import_module("bigmodel.pretrained.hf")
    except ModuleNotFoundError as e:
        raise UserError(
            f"format=hf needs bigmodel.pretrained.hf, which is missing here ({e}); use "
            "format=safetensors or format=onnx"
        ) from None
    import inspect

    from bigmodel.checkpoints import restore
    from bigmodel.deploy.folder import write_folder

    _, datamodule, task = restore(bundle.card["source"], init_from=bundle.model.get("init_from"))
    task.run_config = {"model": bundle.model, "data": bundle.data}
    kwargs = {}
    if "tokenizer" in inspect.signature(hf.export_hf).parameters:
        kwargs["tokenizer"] = getattr(datamodule, "tokenizer", None) or bundle.tokenizer
    write_folder(out, lambda tmp: hf.export_hf(task, tmp, **kwargs), bool(cfg.get("overwrite")))


def _export_peft(cfg: DictConfig, bundle: Bundle, out: Path) -> None:
    from bigmodel.checkpoints import restore
    from bigmodel.deploy.folder import write_folder
    from bigmodel.pretrained.peft_format import export_peft

    if bundle.kind != "lm":
        raise UserError(
            f"format=peft writes the LoRA adapters of language models; this checkpoint is a "
            f"{bundle.kind} model: use format=safetensors or format=onnx"
        )
    _, _, task = restore(bundle.card["source"])  # the net with its adapters, not merged
    task.run_config = {"model": bundle.model, "data": bundle.data}
    write_folder(out, lambda tmp: export_peft(task, tmp), bool(cfg.get("overwrite")))


@reports_user_errors
def export(cfg: DictConfig) -> Path:
    """Write the folder `cfg.out` from `cfg.ckpt_path` and print what it holds."""
    _check(cfg)  # before torch loads: a mistyped option answers at once
    from bigmodel.deploy.bundle import from_checkpoint
    from bigmodel.deploy.folder import write_folder

    init_from = OmegaConf.select(cfg, "model.init_from", default=None)
    bundle = from_checkpoint(cfg.ckpt_path, cfg.paths.log_dir, init_from)
    out = Path(cfg.out)
    if cfg.format == "hf":
        _export_hf(cfg, bundle, out)
    elif cfg.format == "peft":
        _export_peft(cfg, bundle, out)
    else:
        write_folder(
            out, lambda tmp: _fill(bundle, cfg, str(cfg.out), tmp), bool(cfg.get("overwrite"))
        )
    for p in sorted(out.iterdir()):
        print(f"{out / p.name}  {p.stat().st_size / 2**20:.3f} MB")
    return out
