"""Post-training int8 quantization of a trained net for CPU inference, scored next to float32.

`python eval.py ckpt_path=... quantize=int8` tests the checkpoint twice, as trained and quantized,
and prints one table: checkpoint size, every test metric, and test throughput.

Modes (every nn.Linear is quantized; embeddings, norms and convolutions stay float32):
- int8: dynamic quantization with torch's fbgemm int8 kernels (int8 weights, activations
  quantized per batch): the fastest on x86 CPUs in eager mode.
- int8_torchao: the same scheme through torchao's `quantize_` (tensor subclasses; meant to be
  combined with torch.compile, slower than `int8` in eager mode on CPU).
- int8_weight_only: torchao int8 weights, float activations (smallest accuracy loss).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn

from bigmodel.errors import UserError

log = logging.getLogger("bigmodel")

MODES = ("int8", "int8_torchao", "int8_weight_only")


def quantize_net(net: nn.Module, mode: str) -> nn.Module:
    """A quantized copy of `net` (in eval mode) for CPU inference; `net` is left untouched."""
    if mode not in MODES:
        raise UserError(f"quantize={mode} is not one of: {', '.join(MODES)}")
    q = copy.deepcopy(net).cpu().eval()
    if mode == "int8":
        with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(q, {nn.Linear}, dtype=torch.qint8)
    try:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError as e:
        raise UserError(f"quantize={mode} needs torchao: pip install torchao ({e})") from None
    weight_only = mode == "int8_weight_only"
    quantize_(q, Int8WeightOnlyConfig() if weight_only else Int8DynamicActivationInt8WeightConfig())
    return q


def state_size_mb(module: nn.Module) -> float:
    """Size of the module's state_dict as torch.save writes it, in MB (shared tensors once)."""
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell() / 1e6


def _test(trainer_factory: Callable[..., L.Trainer], task, datamodule) -> tuple[dict, float]:
    """Metrics and seconds of one test pass, after a one-batch warm-up (lazy inits, caches)."""
    trainer_factory(limit_test_batches=1).test(task, datamodule=datamodule, verbose=False)
    trainer = trainer_factory()
    t0 = time.perf_counter()
    results = trainer.test(task, datamodule=datamodule, verbose=False)
    seconds = time.perf_counter() - t0
    return {k: float(v) for k, v in (results[0] if results else {}).items()}, seconds


def evaluate_quantized(
    task: L.LightningModule,
    datamodule: L.LightningDataModule,
    trainer_factory: Callable[..., L.Trainer],
    mode: str,
    out: Path,
) -> dict[str, float]:
    """Test `task` in float32 and quantized on the CPU; print and save the comparison.

    `trainer_factory(**overrides)` builds a fresh CPU Trainer for each pass.

    Returns the quantized run's metrics plus `fp32/<metric>`, `size_mb`, `fp32/size_mb`,
    `time_s`, `fp32/time_s` and `speedup` (float32 test time / quantized test time).
    """
    task = task.cpu().eval()
    full_net = task.net
    fp32, fp32_s = _test(trainer_factory, task, datamodule)
    fp32_size = state_size_mb(full_net)
    task.net = quantize_net(full_net, mode)
    try:
        q, q_s = _test(trainer_factory, task, datamodule)
        q_size = state_size_mb(task.net)
    finally:
        task.net = full_net
    metrics = {**q, **{f"fp32/{k}": v for k, v in fp32.items()}}
    metrics.update(
        {
            "size_mb": q_size,
            "fp32/size_mb": fp32_size,
            "time_s": q_s,
            "fp32/time_s": fp32_s,
            "speedup": fp32_s / q_s,
        }
    )
    rows = [("checkpoint MB (net)", fp32_size, q_size)]
    rows += [(k, fp32[k], q.get(k, float("nan"))) for k in sorted(fp32)]
    rows += [("test time s", fp32_s, q_s)]
    lines = [f"{'':24s} {'float32':>12s} {mode:>16s}"]
    lines += [f"{name:24s} {a:12.5g} {b:16.5g}" for name, a, b in rows]
    lines.append(f"{'speed-up':24s} {'':12s} {fp32_s / q_s:15.2f}x")
    print("\n".join(lines), flush=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    (out / "quantize.txt").write_text("\n".join(lines) + "\n")
    return metrics
