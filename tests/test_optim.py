"""Weight-decay groups and learning-rate schedules."""

from __future__ import annotations

import io
import pkgutil

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
from bigmodel.optim import WarmupCosineLR, param_groups
from bigmodel.tasks import Task


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
    files = {f"bigmodel.nets.{m.name}" for m in pkgutil.iter_modules(bigmodel.nets.__path__)}
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
        "vit_cls": {"pos_embed", "cls_token", "patch_embed.bias", "blocks.0.ln_1.weight"},
        "vit_mean": {"pos_embed", "ln_f.weight", "head.bias"},
        "cnn": {"body.stem.1.weight", "body.stem.1.bias", "head.bias"},
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


def test_schedule_needs_steps():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(UserError, match="warmup_steps"):
        WarmupCosineLR(opt, total_steps=10, warmup_steps=-1)
    with pytest.warns(UserWarning, match="warming up for 1"):
        assert WarmupCosineLR(opt, total_steps=10, warmup_steps=10).warmup_steps == 1
    with pytest.raises(UserError, match="trainer.max_steps"):
        WarmupCosineLR(opt, total_steps=None)
