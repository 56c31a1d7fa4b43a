"""ONNX: export with torch's dynamo exporter, parity against PyTorch, int8, ONNX Runtime sessions.

Every graph of `graphs.graphs_of` is exported with `torch.onnx.export(..., dynamo=True)` and
dynamic batch (and sequence) axes, then run by ONNX Runtime on inputs of other shapes than the
export saw, next to PyTorch: the largest absolute difference is recorded. `quantize=int8` adds
ONNX Runtime's dynamic quantization (int8 weights, activations quantized per batch) of each
graph.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bigmodel.deploy.bundle import Bundle
from bigmodel.deploy.graphs import Graph, example_inputs, graphs_of
from bigmodel.errors import UserError

log = logging.getLogger("bigmodel")

# What the dynamo exporter says about itself on every export; none of it is about the model.
_EXPORTER_NOISE = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"# The axis name: .* will not be used",
)


def _quiet_exporter() -> None:
    for message in _EXPORTER_NOISE:
        warnings.filterwarnings("ignore", message=message)
    # their INFO lines narrate each optimisation pass
    for name in ("torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    if not any(isinstance(f, _NoTorchvisionNote) for f in registry.filters):
        registry.addFilter(_NoTorchvisionNote())


class _NoTorchvisionNote(logging.Filter):
    """The exporter notes each torchvision op it cannot register; bigmodel uses none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torchvision is not installed" not in record.getMessage()


def session(path: Path | str):
    """An ONNX Runtime CPU session of one graph."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT's notes on graph optimisations are not ours
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail / InvalidGraph kinds
        raise UserError(f"{path} is not a loadable ONNX graph ({e}); export it again") from None


def run_session(sess, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return sess.run(None, inputs)


def export_graph(graph: Graph, path: Path) -> None:
    """One graph -> path (a single .onnx file, weights inside)."""
    _quiet_exporter()
    try:
        torch.onnx.export(
            graph.module,
            graph.inputs,
            str(path),
            dynamo=True,
            input_names=graph.input_names,
            output_names=graph.output_names,
            dynamic_shapes=graph.dynamic_shapes,
            external_data=False,
            verbose=False,
        )
    except Exception as e:  # the exporter raises many kinds; say which graph and why
        raise UserError(
            f"torch's dynamo ONNX exporter could not export the {graph.name} graph: "
            f"{type(e).__name__}: {str(e).splitlines()[0][:300]}; use format=safetensors"
        ) from None


@torch.no_grad()
def _parity_inputs(bundle: Bundle, graph: Graph) -> tuple[torch.Tensor, ...]:
    """Inputs of other shapes than the export's: the dynamic axes are exercised."""
    if bundle.kind == "seq2seq":
        cfg = bundle.net.config
        src = torch.randint(
            3, cfg.src_vocab_size, (3, 9), generator=torch.Generator().manual_seed(1)
        )
        src[2, 6:] = cfg.pad_id
        memory, mask = graphs_of(bundle)[0].module(src)
        if graph.name == "encoder":
            return (src,)
        tgt = torch.randint(
            3, cfg.tgt_vocab_size, (3, 5), generator=torch.Generator().manual_seed(2)
        )
        return (memory, mask, tgt)
    inputs = example_inputs(bundle, batch=3, seed=1)
    if bundle.kind == "lm":  # another length too
        t = max(1, min(bundle.prep["block_size"], 16) - 3)
        inputs = (inputs[0][:, :t],)
        if graph.name == "decode_step":  # a token over the cache of a prompt of t tokens
            _, keys, values = graphs_of(bundle)[1].module(inputs[0])
            return (inputs[0][:, -1:], keys, values)
    return inputs


def parity(bundle: Bundle, graph: Graph, path: Path) -> float:
    """Max |ONNX Runtime - PyTorch| over the graph's outputs, on fresh inputs."""
    inputs = _parity_inputs(bundle, graph)
    with torch.no_grad():
        ref = graph.module(*inputs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    out = run_session(
        session(path), {n: x.numpy() for n, x in zip(graph.input_names, inputs, strict=True)}
    )
    return max(
        float(np.abs(o.astype(np.float64) - r.double().numpy()).max())
        for o, r in zip(out, ref, strict=True)
    )


def quantize_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime dynamic quantization: int8 weights, activations quantized per batch, after
    ORT's recommended pre-processing (shape inference, graph optimisation)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_name(dst.stem + ".pre.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)  # the quantizer logs a line per tensor on the root logger
    try:
        try:
            quant_pre_process(str(src), str(pre))
        except Exception:  # its symbolic shape inference knows no STFT: quantize as exported
            pre = src
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
        if pre != src:
            pre.unlink(missing_ok=True)


def export_onnx(bundle: Bundle, out: Path, quantize: str | None) -> list[dict]:
    """Every graph of the model to out/<graph>.onnx (and <graph>.int8.onnx) -> parity rows."""
    rows = []
    for graph in graphs_of(bundle):
        path = out / f"{graph.name}.onnx"
        t0 = time.perf_counter()
        export_graph(graph, path)
        diff = parity(bundle, graph, path)
        rows.append(
            {
                "graph": graph.name,
                "file": path.name,
                "format": "onnx fp32",
                "max_abs_diff": diff,
                "size_mb": path.stat().st_size / 2**20,
                "export_s": time.perf_counter() - t0,
            }
        )
        log.info(f"{path.name}: max |onnxruntime - torch| = {diff:.3g}")
        if quantize == "int8":
            q = out / f"{graph.name}.int8.onnx"
            quantize_int8(path, q)
            rows.append(
                {
                    "graph": graph.name,
                    "file": q.name,
                    "format": "onnx int8",
                    "max_abs_diff": parity(bundle, graph, q),
                    "size_mb": q.stat().st_size / 2**20,
                }
            )
    return rows
