"""The exported folder: weights, configs, tokenizer or class names, the model card; atomic writes.

```
DIR/
  model.safetensors   the net's weights (tied weights stored once)
  config.json         kind, model and data config, input settings, card data, parity rows
  classes.json        class names (classifiers)     tokenizer.json   the tokenizer (text models)
  README.md           the model card: data, metrics and their split, the training command
  model.onnx ...      format=onnx: the graphs (encoder.onnx, decoder_step.onnx for seq2seq),
                      and *.int8.onnx with quantize=int8
```
A folder is written under a temporary name beside DIR and renamed into place when complete, so
a reader never sees half a folder; an existing DIR is replaced only with overwrite=true.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from bigmodel.deploy.bundle import FORMAT_VERSION, Bundle
from bigmodel.errors import UserError
from bigmodel.files import readable_as_any_file


# ------------------------------------------------------------------------------ atomic writes
def atomic_write_text(path: Path, text: str) -> None:
    """Write a file under a temporary name, fsync, rename over `path`: never half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UserError(f"could not write {path}: {e.strerror or e}") from None


def write_folder(out: Path, fill: Callable[[Path], None], overwrite: bool) -> None:
    """`fill(tmp)` writes the folder's files into a temporary folder that then becomes `out`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"out={out} already holds files; choose another folder or pass overwrite=true"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ the contents
def write_weights(bundle: Bundle, folder: Path) -> None:
    from safetensors.torch import save_model

    path = folder / "model.safetensors"
    save_model(bundle.net, str(path), metadata={"format": "pt"})
    readable_as_any_file(path)  # safetensors writes 0600


def write_meta(
    bundle: Bundle, folder: Path, fmt: str, rows: list[dict], scores: dict, name: str
) -> None:
    """config.json, classes.json / tokenizer.json and README.md (`name`: the final folder's)."""
    meta = {
        "format_version": FORMAT_VERSION,
        "format": fmt,
        "kind": bundle.kind,
        "model": bundle.model,
        "data": bundle.data,
        "prep": bundle.prep,
        "card": bundle.card,
        "parity": rows,
        "int8_scores": scores,
    }
    if bundle.chat_template:  # chat.py and serve.py's /v1 render conversations with it
        meta["chat_template"] = bundle.chat_template
    (folder / "config.json").write_text(json.dumps(meta, indent=2, default=str))
    if bundle.classes:
        (folder / "classes.json").write_text(json.dumps(bundle.classes, indent=2))
    if bundle.tokenizer is not None:
        (folder / "tokenizer.json").write_text(json.dumps(bundle.tokenizer.to_dict()))
    (folder / "README.md").write_text(model_card(bundle, folder, rows, scores, name))


def _files_table(folder: Path) -> list[str]:
    rows = ["| file | size |", "|---|---|"]
    for p in sorted(folder.iterdir()):
        if p.name != "README.md":
            rows.append(f"| `{p.name}` | {p.stat().st_size / 2**20:.3f} MB |")
    return rows


def model_card(bundle: Bundle, folder: Path, rows: list[dict], scores: dict, name: str) -> str:
    """A short model card: what the model is, its data, metrics (split in each name), the
    command that trained it, the files, parity and int8 figures, and how to use it."""
    card = bundle.card
    n_params = sum(p.numel() for p in bundle.net.parameters())
    lines = [
        f"# {card.get('net', type(bundle.net).__name__).split('.')[-1]} ({bundle.kind})",
        "",
        f"- task: `{card.get('task')}`, net `{card.get('net')}`, {n_params / 1e6:.3f} M parameters",
        f"- trained on: `{card.get('data_module')}` "
        + ", ".join(
            f"{k}={v}"
            for k, v in card.get("data", {}).items()
            if k
            in ("source", "root", "path", "image_size", "sample_rate", "src", "tgt", "tokenizer")
            and v is not None
        ),
        f"- optimizer steps: {card.get('global_step')}; exported from `{card.get('source')}`",
    ]
    if bundle.classes:
        lines.append(f"- classes ({len(bundle.classes)}): {', '.join(bundle.classes)}")
    lines.append(f"- trained with: `{card['command']}`" if card.get("command") else "")
    lines += ["", "## Metrics", ""]
    metrics = card.get("metrics") or {}
    if metrics:
        lines += ["| metric (split/name) | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())]
    else:
        lines.append("The checkpoint's run directory held no metrics.json.")
    if rows:
        lines += ["", "## ONNX parity (ONNX Runtime vs PyTorch, max abs difference)", ""]
        lines += ["| graph | file | max abs diff | size |", "|---|---|---|---|"]
        lines += [
            f"| {r['graph']} | `{r['file']}` | {r['max_abs_diff']:.3g} | {r['size_mb']:.3f} MB |"
            for r in rows
        ]
    if scores:
        lines += ["", f"## int8 next to fp32 ({scores.get('what', '')})", ""]
        lines += ["| engine | " + " | ".join(scores["metrics"]) + " |"]
        lines += ["|---" * (1 + len(scores["metrics"])) + "|"]
        for engine, vals in scores["engines"].items():
            lines.append(
                f"| {engine} | " + " | ".join(f"{vals[m]:.4g}" for m in scores["metrics"]) + " |"
            )
    lines += ["", "## Files", "", *_files_table(folder), ""]
    lines += [
        "## Use",
        "",
        "```bash",
        f"python predict.py model_dir={name} input=INPUT output=preds.csv",
        f"python serve.py model_dir={name} port=8000",
        "```",
        "",
    ]
    return "\n".join(lines)
