"""export.py: the exported folder, and ONNX Runtime against PyTorch for every model family.

Each family is trained for a few steps through train.py (the `trained` fixture, shared with
test_predict.py and test_serve.py), exported through export.py, and the ONNX graphs are run by
ONNX Runtime here, on inputs of other shapes than the export saw, next to the net rebuilt from
the checkpoint: max abs difference <= 1e-4 in fp32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tests.conftest import FAMILIES, run_cli

# the fast suite exports the two models the README serves; the rest run with -m slow
SLOW = {"vit", "audio", "seq2seq", "mlp"}


# every family the session trains, but the tiny LM (which "gpt" covers with more steps)
EXPORTED = {f: args for f, args in FAMILIES.items() if f != "lm"}


def family_params(families=EXPORTED):
    return [
        pytest.param(f, marks=pytest.mark.slow) if f in SLOW else pytest.param(f) for f in families
    ]


def export(ckpt: Path, out: Path, *args: str, check: bool = True):
    proc = run_cli(
        "export.py", f"ckpt_path={ckpt}", f"out={out}", *args, cwd=out.parent, check=check
    )
    assert not (out.parent / "export.log").exists()  # it writes the folder and nothing else
    return proc


def net_from_checkpoint(ckpt: Path):
    """The net as the training run left it, built without bigmodel.deploy (the reference)."""
    import hydra

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    cfg = state["bigmodel"]["config"]
    net = hydra.utils.instantiate(cfg["model"]["net"], _convert_="all")
    net.load_state_dict({k[4:]: v for k, v in state["state_dict"].items() if k.startswith("net.")})
    return net.eval(), cfg, state


def reference_inputs(family: str, net, cfg: dict, state: dict):
    """Fresh inputs (batch 5, other lengths than the export's), the ONNX feeds and torch outputs."""
    g = torch.Generator().manual_seed(123)
    if family in ("cnn", "vit"):
        dm = state["ImageDataModule"]
        mean, std = (
            torch.tensor(dm["mean"]).view(1, -1, 1, 1),
            torch.tensor(dm["std"]).view(1, -1, 1, 1),
        )
        x = torch.rand(5, 1, dm["image_size"], dm["image_size"], generator=g)
        return {"images": x}, [net((x - mean) / std)]
    if family == "audio":
        x = 0.1 * torch.randn(5, 16000, generator=g)
        return {"waves": x}, [net(x)]
    if family == "mlp":
        x = torch.randn(5, 10, generator=g)
        return {"x": x}, [net(x)]
    if family == "gpt":
        idx = torch.randint(0, net.config.vocab_size, (5, 11), generator=g)
        return {"idx": idx}, [net(idx)]
    raise ValueError(family)


@pytest.mark.parametrize("family", family_params())
def test_onnx_export_matches_pytorch(family, trained, tmp_path):
    run = trained(family)
    ckpt = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "exported"
    export(ckpt, out, "format=onnx", "quantize=int8")
    meta = json.loads((out / "config.json").read_text())
    graphs = {
        "seq2seq": ["encoder", "decoder_step"],
        # a language model: the whole window, and the cached decoding's two graphs
        "gpt": ["model", "prefill", "decode_step"],
    }.get(family, ["model"])
    for g in graphs:
        assert (out / f"{g}.onnx").is_file() and (out / f"{g}.int8.onnx").is_file()
    assert (out / "model.safetensors").is_file()
    # export.py's own parity figures
    fp32 = [r for r in meta["parity"] if r["format"] == "onnx fp32"]
    assert [r["graph"] for r in fp32] == graphs
    assert all(r["max_abs_diff"] <= 1e-4 for r in fp32), fp32
    # int8 scored next to fp32 on the held-out data, with the same metric for every engine
    scores = meta["int8_scores"]
    assert set(scores["engines"]) == {"torch fp32", "onnx fp32", "onnx int8"}
    metric = scores["metrics"][0]
    torch_score = scores["engines"]["torch fp32"][metric]
    assert scores["engines"]["onnx fp32"][metric] == pytest.approx(torch_score, abs=1e-4)
    card = (out / "README.md").read_text()
    assert "python train.py" in card and "int8" in card and "test/" in card

    net, cfg, state = net_from_checkpoint(ckpt)
    if family == "seq2seq":
        _check_seq2seq(net, out)
        return
    feeds, ref = reference_inputs(family, net, cfg, state)
    with torch.no_grad():
        ref = [r.numpy() for r in ref]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
    diff = max(float(np.abs(a - b).max()) for a, b in zip(got, ref, strict=True))
    assert diff <= 1e-4, diff
    # int8: a smaller or equal file, outputs close to fp32 (quantization noise, not a new model)
    q = ort.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    got8 = q.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    assert np.abs(got8 - ref[0]).max() < 0.25 * np.abs(ref[0]).max() + 0.05


def _check_seq2seq(net, out: Path) -> None:
    """Encoder and decoder step by ONNX Runtime against the net's own encode and forward."""
    cfg = net.config
    g = torch.Generator().manual_seed(5)
    src = torch.randint(3, cfg.src_vocab_size, (4, 12), generator=g)
    src[1, 8:] = cfg.pad_id
    tgt = torch.randint(3, cfg.tgt_vocab_size, (4, 6), generator=g)
    enc = ort.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    memory, mask = enc.run(None, {"src": src.numpy()})
    with torch.no_grad():
        ref_mem, _ = net.encode(src)
        ref_logp = torch.log_softmax(net(src, tgt)[:, -1].float(), -1)  # teacher-forced forward
    assert np.abs(memory - ref_mem.numpy()).max() <= 1e-4
    dec = ort.InferenceSession(str(out / "decoder_step.onnx"), providers=["CPUExecutionProvider"])
    (logp,) = dec.run(None, {"memory": memory, "mask": mask, "tgt": tgt.numpy()})
    assert np.abs(logp - ref_logp.numpy()).max() <= 1e-4


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_safetensors_folder_holds_the_checkpoint(trained, tmp_path):
    from safetensors.torch import load_file

    run = trained("cnn")
    ckpt = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "digits"
    proc = export(ckpt, out)  # format=safetensors is the default
    assert "model.safetensors" in proc.stdout
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    weights = load_file(out / "model.safetensors")
    net_state = {k[4:]: v for k, v in state["state_dict"].items() if k.startswith("net.")}
    assert set(weights) == set(net_state)
    assert all(torch.equal(weights[k], net_state[k]) for k in weights)
    assert json.loads((out / "classes.json").read_text()) == state["ImageDataModule"]["classes"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["kind"] == "image" and meta["prep"]["mean"] == state["ImageDataModule"]["mean"]
    assert not list(out.glob("*.onnx"))
    # the weights are as readable as the rest of the folder (safetensors itself writes 0600)
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~current_umask(), modes
    card = (out / "README.md").read_text()
    # the metrics come with their split, and the command that trained the model
    assert "best val/acc" in card and "test/acc" in card
    assert "python train.py experiment=digits_cnn" in card


def test_gpt_folder_holds_the_tokenizer_once_tied(trained, tmp_path):
    from safetensors.torch import load_file

    run = trained("gpt")
    out = tmp_path / "gpt"
    export(run / "checkpoints" / "last.ckpt", out)
    tok = json.loads((out / "tokenizer.json").read_text())
    assert tok == json.loads((run / "tokenizer.json").read_text())
    weights = load_file(out / "model.safetensors")
    # the output head is tied to the embedding: stored once
    assert ("wte.weight" in weights) != ("lm_head.weight" in weights)


def test_bad_export_requests_get_one_line(trained, tmp_path):
    run = trained("cnn")
    ckpt = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cases = [
        ((f"out={out}",), "already holds files"),
        ((f"out={tmp_path / 'a'}", "format=torchscript"), "format=torchscript is not one of"),
        ((f"out={tmp_path / 'b'}", "quantize=int8"), "add format=onnx"),
        (
            (f"out={tmp_path / 'c'}", "format=hf"),
            "format=hf writes Hugging Face folders of language models",
        ),
        (
            (f"out={tmp_path / 'd'}", "format=peft"),
            "format=peft writes the LoRA adapters of language models",
        ),
    ]
    for args, message in cases:
        proc = run_cli("export.py", f"ckpt_path={ckpt}", *args, cwd=tmp_path, check=False)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert (out / "keep.txt").read_text() == "mine"  # nothing written over
    proc = run_cli("export.py", "ckpt_path=/no/such.ckpt", "out=x", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_hf_format_goes_to_the_hugging_face_exporter(trained, tmp_path):
    import importlib.util

    run = trained("gpt")
    out = tmp_path / "hf"
    proc = export(run / "checkpoints" / "last.ckpt", out, "format=hf", check=False)
    if importlib.util.find_spec("bigmodel.pretrained.hf") is None:
        assert proc.returncode == 2
        assert "format=hf needs bigmodel.pretrained.hf" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert (out / "config.json").is_file()
