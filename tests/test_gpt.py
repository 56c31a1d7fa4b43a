"""The GPT net: shapes, causality, weight tying, init, sizes, sampling."""

from __future__ import annotations

import pytest
import torch

from bigmodel.nets import GPT, GPTConfig


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(
        GPTConfig(
            **{"vocab_size": 50, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, **kw}
        )
    )


def test_forward_shape_and_causality():
    m = tiny().eval()
    x = torch.randint(0, 50, (3, 16))
    logits = m(x)
    assert logits.shape == (3, 16, 50)
    # Changing a future token must leave every earlier position's logits unchanged.
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 50
    logits2 = m(x2)
    torch.testing.assert_close(logits[:, :10], logits2[:, :10])
    assert not torch.allclose(logits[:, 10:], logits2[:, 10:])


def test_weight_tying_and_residual_init():
    m = tiny(n_layer=4)
    assert m.lm_head.weight is m.wte.weight
    # GPT-2 init: residual projections are scaled by 1/sqrt(2 * n_layer).
    std = m.blocks[0].attn.proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 4) ** 0.5) < 0.003
    assert abs(m.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.003


def test_gpt2_124m_size():
    m = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    # GPT-2 small: 124.44 M parameters including the position embedding.
    assert m.num_params(non_embedding=False) == 124_439_808


def test_bad_config_is_explained():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="block_size must be positive"):
        GPTConfig(block_size=0)


def test_dropout_and_activation_checkpointing_train():
    m = tiny(dropout=0.1, activation_checkpointing=True).train()
    x = torch.randint(0, 50, (2, 16))
    loss = m(x).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


def test_generate_greedy_is_deterministic_and_crops_context():
    m = tiny().eval()
    idx = torch.randint(0, 50, (2, 4))
    a = m.generate(idx, 30, temperature=0)  # longer than block_size: the context is cropped
    b = m.generate(idx, 30, temperature=0)
    assert a.shape == (2, 34) and torch.equal(a, b) and torch.equal(a[:, :4], idx)
    g = torch.Generator().manual_seed(1)
    s = m.generate(idx, 10, temperature=1.0, top_k=1, generator=g)
    torch.testing.assert_close(s, m.generate(idx, 10, temperature=0))  # top_k=1 is greedy
