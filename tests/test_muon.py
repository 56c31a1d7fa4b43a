"""`optimizer=muon`: its updates are torch.optim.Muon's on the hidden matrices and
torch.optim.AdamW's on the rest, as one optimizer that Lightning drives like any other."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from bigmodel.muon import MuonAdamW, orthogonalize
from tests.conftest import TINY_LM, run_cli


def steps(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[list[torch.Tensor]]):
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_groups_update_as_torch_muon(shape, nesterov):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g)
    grads = [[torch.randn(shape, generator=g)] for _ in range(4)]
    ours, ref = w.clone().requires_grad_(), w.clone().requires_grad_()
    kw = {"lr": 0.02, "momentum": 0.95, "nesterov": nesterov, "weight_decay": 0.1}
    steps(MuonAdamW([{"params": [ours], "muon": True}], ns_dtype="bfloat16", **kw), [ours], grads)
    steps(torch.optim.Muon([ref], **kw), [ref], grads)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)  # the same arithmetic, bit for bit


def test_float32_orthogonalization_is_close_to_bfloat16_and_orthogonal():
    g = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    o32, o16 = orthogonalize(g, 5, torch.float32), orthogonalize(g, 5, torch.bfloat16)
    assert (o32 - o16.float()).abs().max() < 0.05
    # the singular values land near 1 (the quintic iteration aims at (0.7, 1.2), not exactly 1)
    s = torch.linalg.svdvals(o32)
    assert s.min() > 0.5 and s.max() < 1.3


def test_other_groups_update_as_torch_adamw():
    g = torch.Generator().manual_seed(2)
    params = [torch.randn(8, 4, generator=g), torch.randn(4, generator=g)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(5)]
    ours = [p.clone().requires_grad_() for p in params]
    ref = [p.clone().requires_grad_() for p in params]
    opt = MuonAdamW(
        [
            {"params": [ours[0]], "muon": False, "weight_decay": 0.1},
            {"params": [ours[1]], "muon": False, "weight_decay": 0.0},
        ],
        adam_lr=3e-3,
        adam_betas=(0.8, 0.95),
        adam_eps=1e-8,
    )
    torch_opt = torch.optim.AdamW(
        [{"params": [ref[0]], "weight_decay": 0.1}, {"params": [ref[1]], "weight_decay": 0.0}],
        lr=3e-3,
        betas=(0.8, 0.95),
        eps=1e-8,
        foreach=False,
    )
    steps(opt, ours, grads)
    steps(torch_opt, ref, grads)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(2)
        )
        self.head = nn.Linear(8, 10, bias=False)


def test_muon_takes_the_hidden_matrices_only():
    net = TwoBlocks()
    groups = MuonAdamW.groups_for(net, 0.1)
    names = {id(p): n for n, p in net.named_parameters()}
    by_kind = {
        (g["muon"], g["weight_decay"]): sorted(names[id(p)] for p in g["params"]) for g in groups
    }
    assert by_kind == {
        (True, 0.1): ["blocks.0.1.weight", "blocks.1.1.weight"],
        (False, 0.1): ["head.weight"],  # the output head: AdamW
        (False, 0.0): sorted(
            ["emb.weight"]
            + [f"blocks.{i}.{j}.{w}" for i in range(2) for j, w in ((0, "weight"), (0, "bias"))]
            + [f"blocks.{i}.1.bias" for i in range(2)]
        ),
    }


def test_momentum_warmup_and_state_round_trip():
    net = TwoBlocks()
    opt = MuonAdamW(
        MuonAdamW.groups_for(net, 0.0),
        momentum_start=0.85,
        momentum=0.95,
        momentum_warmup_steps=10,
    )
    group = opt.param_groups[0]
    assert [round(MuonAdamW._momentum(group, t), 4) for t in (1, 6, 11, 50)] == [
        0.85,
        0.9,
        0.95,
        0.95,
    ]
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    torch.save(state, buf := __import__("io").BytesIO())
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["param_groups"][0]["muon"] is True


def test_a_run_with_muon_trains_clips_logs_and_resumes(tmp_path):
    """One optimizer for Lightning: gradient clipping and accumulation stay on, each group's lr
    is logged, and a run stopped half-way and resumed ends with the uninterrupted run's weights,
    bit for bit (the momentum buffers and step counts are in the checkpoint)."""
    args = [
        *TINY_LM,
        "optimizer=muon",
        "optimizer.momentum_warmup_steps=8",
        # one schedule for both (a run extended past its planned end re-plans its cosine)
        "scheduler.scheduler.total_steps=12",
        "trainer.gradient_clip_val=1.0",
        "trainer.accumulate_grad_batches=2",
        "trainer.log_every_n_steps=1",
        "test=false",
    ]
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    run_cli("train.py", *args, f"hydra.run.dir={whole}", cwd=tmp_path)
    run_cli("train.py", *args, f"hydra.run.dir={halves}", "trainer.max_steps=6", cwd=tmp_path)
    run_cli("train.py", *args, f"hydra.run.dir={halves}", cwd=tmp_path)
    header = (whole / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "optimizer: MuonAdamW (lr=0.02" in (whole / "train.log").read_text()
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (whole, halves))
    assert a["global_step"] == b["global_step"] == 12
    groups = a["optimizer_states"][0]["param_groups"]
    # model=speedrun's head is untied: Muon's matrices, AdamW's head (decayed when weight decay
    # is set), then AdamW's embedding and norms (never decayed)
    assert [g["muon"] for g in groups] == [True, False, False]
    assert [g["initial_lr"] for g in groups] == [0.02, 0.003, 0.003]  # each its own base lr
    assert [c for c in header if c.startswith("lr-")] == [f"lr-MuonAdamW/pg{i}" for i in (1, 2, 3)]
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=0, atol=0, msg=k)
