"""Weight-decay groups and learning-rate schedules."""

from __future__ import annotations

import io
import logging
import math
import pkgutil
import warnings

import pytest
import torch
import torch.nn as nn

import bigmodel.nets
from bigmodel.errors import UserError
from bigmodel.nets import (
    CNN,
    GPT,
    MLP,
    AudioCNN,
    LogMel,
    Seq2SeqTransformer,
    SpecAugment,
    ViT,
)
from bigmodel.optim import WarmupCosineLR, WarmupStableDecayLR, param_groups
from bigmodel.tasks import Task
from tests.conftest import TINY_LM, logged, run_cli, run_dirs


def test_weight_decay_only_on_weight_matrices():
    m = GPT(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8, bias=True)
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decayed == {
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc.weight",
        "blocks.0.mlp.proj.weight",
    }
    # embeddings (tied to the head), norms and biases are all in the other group, once each
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == sum(p.numel() for p in m.parameters())


def small_nets() -> dict[str, nn.Module]:
    """Every net of bigmodel.nets, small, in each variant that changes its parameters."""
    seq2seq = {"n_embd": 8, "n_head": 2, "n_enc_layer": 1, "n_dec_layer": 1}
    vit = {
        "num_classes": 3,
        "in_channels": 1,
        "image_size": 8,
        "patch_size": 4,
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 8,
    }
    return {
        "gpt": GPT(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8),
        "gpt_no_bias": GPT(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8, bias=False),
        "gpt_qwen3_untied": GPT(
            vocab_size=20,
            block_size=8,
            n_layer=1,
            n_head=2,
            n_kv_head=1,
            head_dim=6,
            n_embd=8,
            bias=False,
            norm="rmsnorm",
            positions="rotary",
            mlp="swiglu",
            qk_norm=True,
            tie_embeddings=False,
        ),
        "vit_cls": ViT(**vit, pool="cls"),
        "vit_mean": ViT(**vit, pool="mean"),
        "cnn": CNN(num_classes=3, in_channels=1, widths=(4, 8)),
        "audio_cnn": AudioCNN(
            num_classes=3, sample_rate=8000, n_fft=64, hop_length=32, n_mels=8, widths=(4, 8)
        ),
        "log_mel": LogMel(sample_rate=8000, n_fft=64, hop_length=32, n_mels=8),
        "spec_augment": SpecAugment(freq_mask=2, time_mask=2),
        "mlp": MLP(4, 3, hidden=(5, 6)),
        "seq2seq_shared_tied": Seq2SeqTransformer(src_vocab_size=20, tgt_vocab_size=20, **seq2seq),
        "seq2seq_separate_untied": Seq2SeqTransformer(
            src_vocab_size=20,
            tgt_vocab_size=30,
            share_embeddings=False,
            tie_output=False,
            **seq2seq,
        ),
    }


def weight_matrices(model: nn.Module) -> set[int]:
    """ids of the weights of Linear and conv layers that are not also an embedding table."""
    matrices, embeddings = set(), set()
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            matrices.add(id(m.weight))
        elif isinstance(m, nn.Embedding):
            embeddings.add(id(m.weight))
    return matrices - embeddings


def test_the_test_builds_every_net():
    exported = {getattr(bigmodel.nets, n) for n in bigmodel.nets.__all__}
    modules = {c for c in exported if isinstance(c, type) and issubclass(c, nn.Module)}
    built = small_nets().values()
    assert {type(n) for n in built} == modules
    modules = pkgutil.iter_modules(bigmodel.nets.__path__)
    # the building blocks the nets share, not nets: layers, the decoder's rotary positions,
    # its key/value caches and its masks
    parts = {"layers", "rope", "kv_cache", "masks"}
    files = {f"bigmodel.nets.{m.name}" for m in modules if m.name not in parts}
    assert {type(n).__module__ for n in built} == files


@pytest.mark.parametrize("name", list(small_nets()))
def test_every_net_decays_exactly_its_weight_matrices(name):
    net = small_nets()[name]
    # Training builds the groups from the task, which holds the net as `net`: check both.
    for model in (net, Task(net)):
        groups = param_groups(model, 0.1)
        decayed = [p for g in groups if g["weight_decay"] == 0.1 for p in g["params"]]
        kept = [p for g in groups if g["weight_decay"] == 0.0 for p in g["params"]]
        assert sum(len(g["params"]) for g in groups) == len(decayed) + len(kept)
        ids = [id(p) for p in decayed + kept]
        assert len(ids) == len(set(ids)), "a parameter is in both groups (or twice in one)"
        params = dict(model.named_parameters())  # tied parameters appear once
        assert set(ids) == {id(p) for p in params.values()}, "a parameter is in no group"
        matrices, decayed_ids = weight_matrices(model), {id(p) for p in decayed}
        for pname, p in params.items():
            got, want = id(p) in decayed_ids, id(p) in matrices
            assert got == want, f"{name}: {pname} is {'' if got else 'not '}decayed"
    # The parameters the README promises are never decayed, by name.
    no_decay = {n for n, p in net.named_parameters() if id(p) not in weight_matrices(net)}
    promised = {
        "gpt": {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "blocks.0.attn.qkv.bias"},
        "gpt_qwen3_untied": {"wte.weight", "blocks.0.attn.q_norm.weight", "ln_f.weight"},
        "vit_cls": {"pos_embed", "cls_token", "patch_embed.bias", "blocks.0.ln_1.weight"},
        "vit_mean": {"pos_embed", "ln_f.weight", "head.bias"},
        "cnn": {"body.stem.1.weight", "body.stem.1.bias", "head.fc.bias"},
        "audio_cnn": {"norm.weight", "norm.bias"},
        "seq2seq_shared_tied": {"src_emb.weight", "ln_enc.weight"},
        "seq2seq_separate_untied": {"src_emb.weight", "tgt_emb.weight"},
    }
    assert promised.get(name, set()) <= no_decay


def test_no_weight_decay_names_must_exist():
    class Typo(ViT):
        def no_weight_decay(self) -> set[str]:
            return {"pos_embedding"}

    with pytest.raises(ValueError, match="'pos_embedding', which is not one of its parameters"):
        param_groups(Typo(num_classes=3, image_size=8, n_layer=1, n_head=2, n_embd=8), 0.1)


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


def test_warmup_stable_decay_is_its_formula_and_resumes_at_the_same_point():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    s = WarmupStableDecayLR(opt, total_steps=100, warmup_steps=10, decay_fraction=0.25)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    # MiniCPM's trapezoid: (i + 1) / 11 up, flat at the base lr, down in a line over the last
    # 25 steps to min_lr_ratio (0) x lr at step 100, and there after
    expect = [2.0 * (i + 1) / 11 for i in range(10)] + [2.0] * 65
    expect += [2.0 * (1 - (i - 75) / 25) for i in range(75, 100)] + [0.0] * 10
    assert lrs == pytest.approx(expect, abs=1e-12)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    s2 = WarmupStableDecayLR(torch.optim.SGD([p], lr=2.0), total_steps=100, warmup_steps=10)
    s2.load_state_dict(torch.load(buf, weights_only=True))
    assert s2.decay_fraction == 0.25 and s2.last_epoch == 110
    with pytest.raises(UserError, match=r"decay_fraction=0 must be in \(0, 1\]"):
        WarmupStableDecayLR(opt, total_steps=100, decay_fraction=0)
    with pytest.raises(UserError, match="the warmup-stable-decay schedule needs a positive"):
        WarmupStableDecayLR(opt, total_steps=None)


def test_schedule_needs_steps(caplog):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(UserError, match="warmup_steps"):
        WarmupCosineLR(opt, total_steps=10, warmup_steps=-1)
    # a warmup longer than the run: one warning line of bigmodel's, not a Python warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert WarmupCosineLR(opt, total_steps=10, warmup_steps=10).warmup_steps == 1
    (record,) = [r for r in caplog.records if "warming up" in r.getMessage()]
    assert record.name == "bigmodel" and record.levelno == logging.WARNING
    assert record.getMessage() == (
        "scheduler warmup_steps=10 >= total_steps=10: warming up for 1 steps (a tenth of the "
        "run) instead"
    )
    with pytest.raises(UserError, match="trainer.max_steps"):
        WarmupCosineLR(opt, total_steps=None)


def cosine_lrs(total: int, start: int, stop: int, **kw) -> list[float]:
    """Steps start..stop-1 of an uninterrupted schedule planned for `total` (base lr 1.0)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = WarmupCosineLR(opt, total_steps=total, warmup_steps=10, min_lr_ratio=0.1, **kw)
    lrs = []
    for _ in range(stop):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return lrs[start:]


def resumed_lrs(saved_total: int, new_total: int, at: int, stop: int, **kw) -> list[float]:
    """Stop a schedule planned for `saved_total` at step `at`, resume it the way Lightning does
    (optimizer state, then scheduler state, through torch.save) planned for `new_total`."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = WarmupCosineLR(opt, total_steps=saved_total, warmup_steps=10, min_lr_ratio=0.1)
    for _ in range(at):
        opt.step()
        s.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": s.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    opt2 = torch.optim.SGD([p], lr=1.0)
    s2 = WarmupCosineLR(opt2, total_steps=new_total, warmup_steps=10, min_lr_ratio=0.1, **kw)
    opt2.load_state_dict(ckpt["opt"])
    s2.load_state_dict(ckpt["sched"])
    assert s2.last_epoch == at and s2.warmup_steps == 10
    lrs = []
    for _ in range(at, stop):
        lrs.append(opt2.param_groups[0]["lr"])
        opt2.step()
        s2.step()
    return lrs


def resume_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming at")]


def test_resume_with_a_larger_total_replans_or_keeps_the_saved_plan(caplog):
    caplog.set_level(logging.INFO, logger="bigmodel")
    # replan: from the step reached on, exactly the lrs of a run planned for 200 from the start
    replanned = resumed_lrs(100, 200, at=60, stop=210)
    assert replanned == cosine_lrs(200, 60, 210)
    assert replanned[0] > 0.5 and replanned[-1] == pytest.approx(0.1)  # not at the floor early
    (line,) = resume_lines(caplog)
    assert line.startswith(
        "resuming at step 60 with 200 total steps (the checkpoint planned 100): the cosine "
        "schedule is re-planned to 200 steps"
    )
    assert line.endswith("scheduler.scheduler.on_resume=saved keeps the saved plan")
    caplog.clear()
    # saved: the checkpoint's plan, so everything past step 100 is at the floor
    kept = resumed_lrs(100, 200, at=60, stop=210, on_resume="saved")
    assert kept == cosine_lrs(100, 60, 210)
    assert kept[40:] == [pytest.approx(0.1)] * 110
    (line,) = resume_lines(caplog)
    assert "(the checkpoint planned 100): on_resume=saved keeps the saved plan" in line
    assert "so the last 100 steps train at the floor lr (min_lr_ratio=0.1 x lr)" in line
    assert "scheduler.scheduler.on_resume=replan re-plans it" in line


def test_resume_with_the_same_total_is_exact_and_silent(caplog):
    caplog.set_level(logging.INFO, logger="bigmodel")
    for on_resume in ("replan", "saved"):
        for at in (0, 5, 60, 100, 110):  # in warmup, in the cosine, at and past the end
            assert resumed_lrs(100, 100, at, 130, on_resume=on_resume) == cosine_lrs(100, at, 130)
    assert resume_lines(caplog) == []


def test_resume_with_a_shorter_total(caplog):
    caplog.set_level(logging.INFO, logger="bigmodel")
    # still inside the new total: the shorter cosine from here on
    assert resumed_lrs(100, 80, at=60, stop=90) == cosine_lrs(80, 60, 90)
    (line,) = resume_lines(caplog)
    assert "the cosine schedule is re-planned to 80 steps (lr" in line
    caplog.clear()
    # already past it: the floor, and the line says so
    assert resumed_lrs(100, 50, at=60, stop=70) == [pytest.approx(0.1)] * 10
    (line,) = resume_lines(caplog)
    assert (
        "re-planned to 50 steps, which this run is already past: the lr stays at the floor" in line
    )
    caplog.clear()
    # a total inside the saved warmup: warm up until it, then the floor
    lrs = resumed_lrs(100, 8, at=5, stop=12)
    # the new scheduler's own warmup is dropped (under 10 steps), said without a warning
    (cut,) = [r for r in caplog.records if "warmup_steps=10 >= total_steps=8" in r.getMessage()]
    assert cut.getMessage().endswith(": no warmup in a run this short")
    assert cut.levelno == logging.INFO
    assert lrs[:3] == cosine_lrs(100, 5, 8) and lrs[3:] == [pytest.approx(0.1)] * 4
    caplog.clear()
    assert resumed_lrs(100, 80, at=60, stop=90, on_resume="saved") == cosine_lrs(100, 60, 90)
    (line,) = resume_lines(caplog)
    assert "training stops at step 80, before the cosine reaches its floor at step 100" in line


def test_on_resume_is_the_resuming_runs_choice():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(UserError, match=r"scheduler.scheduler.on_resume='keep' .* replan, saved"):
        WarmupCosineLR(opt, total_steps=10, on_resume="keep")
    old = WarmupCosineLR(opt, total_steps=10, on_resume="saved").state_dict()
    new = WarmupCosineLR(opt, total_steps=20)
    new.load_state_dict(old)
    assert new.on_resume == "replan" and new.total_steps == 20
    del old["on_resume"]  # a checkpoint written before the option existed
    new.load_state_dict(old)
    assert new.total_steps == 20


@pytest.mark.slow  # CI runs it after the fast suite
def test_train_py_extends_a_finished_run(tmp_path):
    """Resuming with a larger trainer.max_steps re-plans the cosine (or keeps the floor)."""
    base = [
        "model=gpt",  # AdamW and warmup-cosine
        *TINY_LM,
        "trainer.max_steps=8",
        "trainer.val_check_interval=4",
        "test=false",
        "trainer.log_every_n_steps=1",
    ]
    run_cli("train.py", *base, cwd=tmp_path)
    (first,) = run_dirs(tmp_path)
    lr, floor = 1e-3, 1e-4  # optimizer=adamw's lr, min_lr_ratio=0.1 of it
    assert logged(first, "lr-AdamW/pg1")[-1] == pytest.approx(lr * cosine_factor(8, 2, 7))
    resume = [*base, f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=16"]
    head = "resuming at step 8 with 16 total steps (the checkpoint planned 8): "
    seen = {first}
    for on_resume in ("replan", "saved"):
        proc = run_cli(
            "train.py", *resume, f"scheduler.scheduler.on_resume={on_resume}", cwd=tmp_path
        )
        (run,) = set(run_dirs(tmp_path)) - seen
        seen.add(run)
        lrs = logged(run, "lr-AdamW/pg1")  # steps 8..15
        out = proc.stdout + proc.stderr
        assert sum(head in line for line in out.splitlines()) == 1, out[-3000:]
        if on_resume == "replan":
            assert lrs == pytest.approx([lr * cosine_factor(16, 2, s) for s in range(8, 16)])
            assert lrs[0] > 5 * floor
            assert head + "the cosine schedule is re-planned to 16 steps" in out
        else:
            assert lrs == pytest.approx([floor] * 8)
            assert head + "on_resume=saved keeps the saved plan" in out


def cosine_factor(total: int, warmup: int, step: int) -> float:
    """WarmupCosineLR's factor written out, min_lr_ratio=0.1."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / (total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
