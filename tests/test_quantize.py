"""int8 post-training quantization: eval.py quantize=... tests the net in float32 and int8."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bigmodel.errors import UserError
from bigmodel.nets import GPT
from bigmodel.quantize import quantize_net, state_size_mb
from tests.conftest import TINY_LM, run_cli, run_dirs


def test_int8_gpt_is_smaller_and_close_to_float32():
    torch.manual_seed(0)
    net = GPT(vocab_size=128, block_size=32, n_layer=2, n_head=4, n_embd=128).eval()
    x = torch.randint(0, 128, (4, 32))
    with torch.no_grad():
        ref = net(x)
        for mode in ("int8", "int8_weight_only"):
            q = quantize_net(net, mode)
            out = q(x)
            assert state_size_mb(q) < 0.6 * state_size_mb(net), mode
            # int8 weights move logits a little, never the picture: same top token almost always
            agree = (out.argmax(-1) == ref.argmax(-1)).float().mean()
            assert agree > 0.9, (mode, agree)
            assert (out - ref).abs().max() < 0.1 * ref.abs().max(), mode
    assert isinstance(net.blocks[0].attn.qkv, torch.nn.Linear)  # the original is untouched


def test_unknown_mode_is_a_user_error():
    with pytest.raises(UserError, match="int8_weight_only"):
        quantize_net(torch.nn.Linear(2, 2), "int4")


def test_eval_quantize_int8_reports_metric_size_and_speed(tmp_path):
    # long enough, at a higher learning rate, for the net to learn the text (an untrained net's
    # near-uniform logits hide any quantization error)
    run_cli(
        "train.py",
        *TINY_LM,
        "trainer.max_steps=150",
        "trainer.val_check_interval=50",
        "optimizer.lr=0.01",
        "test=false",
        cwd=tmp_path,
    )
    (run,) = run_dirs(tmp_path)
    proc = run_cli("eval.py", "ckpt_path=last", "quantize=int8", cwd=tmp_path)
    assert "float32" in proc.stdout and "speed-up" in proc.stdout
    (ev,) = run_dirs(tmp_path, "eval")
    m = json.loads((ev / "metrics.json").read_text())
    assert m["size_mb"] < m["fp32/size_mb"]
    # learned: far below the loss of a uniform guess over the characters, ln(vocab)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    vocab = ckpt["bigmodel"]["config"]["model"]["net"]["vocab_size"]
    assert m["fp32/test/loss"] < math.log(vocab) - 1.5, (m["fp32/test/loss"], math.log(vocab))
    # int8 weights (a step of max|w|/127 per tensor) and per-batch int8 activations move this
    # net's test loss by well under 1 %; 2 % leaves room for other CPUs' kernels while a broken
    # quantization (wrong scale, a layer dropped) moves it by tens of percent
    assert m["test/loss"] == pytest.approx(m["fp32/test/loss"], rel=0.02)
    assert m["speedup"] > 0 and m["time_s"] > 0
    assert (ev / "quantize.txt").read_text().splitlines()[0].split() == ["float32", "int8"]
