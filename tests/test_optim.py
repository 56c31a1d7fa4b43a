"""Weight-decay groups and learning-rate schedules."""

from __future__ import annotations

import io

import pytest
import torch

from bigmodel.errors import UserError
from bigmodel.nets import GPT
from bigmodel.optim import WarmupCosineLR, param_groups


def test_weight_decay_only_on_weight_matrices():
    m = GPT(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8, bias=True)
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decayed == {"blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                       "blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight"}
    # embeddings (tied to the head), norms and biases are all in the other group, once each
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == sum(p.numel() for p in m.parameters())


def test_warmup_cosine_shape_and_resume():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = WarmupCosineLR(opt, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    lrs = []
    for _ in range(120):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert lrs[0] < lrs[5] < lrs[10]  # warming up
    assert lrs[10] == pytest.approx(1.0, abs=1e-6)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)  # half way down the cosine
    assert lrs[100] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    # its state is plain data and resumes at the same point
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    opt2 = torch.optim.SGD([p], lr=1.0)
    s2 = WarmupCosineLR(opt2, total_steps=100, warmup_steps=10)
    s2.load_state_dict(torch.load(buf, weights_only=True))
    assert s2.last_epoch == s.last_epoch and s2.factor(50) == s.factor(50)


def test_schedule_needs_steps():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(UserError, match="warmup_steps"):
        WarmupCosineLR(opt, total_steps=10, warmup_steps=-1)
    with pytest.warns(UserWarning, match="warming up for 1"):
        assert WarmupCosineLR(opt, total_steps=10, warmup_steps=10).warmup_steps == 1
    with pytest.raises(UserError, match="trainer.max_steps"):
        WarmupCosineLR(opt, total_steps=None)
