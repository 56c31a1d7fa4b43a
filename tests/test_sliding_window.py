"""Sliding-window attention (Mistral v0.1) past the window: the rolling key/value cache against
transformers' own MistralForCausalLM on the same small random weights.

What transformers does, read from its source (5.x, models/mistral/modeling_mistral.py and
cache_utils.py) and checked here too: `generate` with its default cache builds
`DynamicCache(config=...)`, whose layers for a config with `sliding_window` are
`DynamicSlidingWindowLayer`s (they keep the last window - 1 keys and values), and the mask is
`create_sliding_window_causal_mask` (a query sees itself and the window - 1 keys before it), with
rotary positions counted from the start. So its greedy tokens are those of the whole sequence
run at once under the sliding mask, and the comparison with our decoding is like for like.
"""

from __future__ import annotations

import pytest
import torch

from bigmodel.nets import GPT
from bigmodel.nets.kv_cache import RollingKVCache
from bigmodel.pretrained import hf

transformers = pytest.importorskip("transformers")

WINDOW, PROMPT, NEW = 16, 20, 64  # the prompt alone is longer than the window


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """A tiny random MistralForCausalLM (2 layers, width 64, GQA, window 16) saved by
    transformers, and the same weights read into our net."""
    config = transformers.MistralConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=WINDOW,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).eval()
    with torch.no_grad():  # every tensor random, spread enough that greedy tokens vary
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    folder = tmp_path_factory.mktemp("mistral")
    model.save_pretrained(folder)
    model.generation_config.eos_token_id = None  # 64 tokens, whatever they are
    net = GPT(**hf.net_config(folder))
    hf.load_weights(net, folder)
    return model, net.eval(), folder


def theirs(model, ids: torch.Tensor) -> torch.Tensor:
    # every position real: without the mask, generate would take the ids equal to pad_token_id
    # in the prompt for padding
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
        pad_token_id=0,
    )  # fmt: skip


def test_greedy_past_the_window_is_transformers_greedy(mistral):
    model, net, _ = mistral
    assert (net.config.sliding_window, net.config.block_size) == (WINDOW, WINDOW)
    ids = torch.randint(0, 96, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    reference = theirs(model, ids)
    mine = net.generate(ids, NEW, temperature=0)
    assert torch.equal(mine, reference), (mine != reference).nonzero()[:5].tolist()

    # transformers' generate is its whole-sequence forward under the sliding mask, greedy
    with torch.no_grad():
        whole = model(reference, use_cache=False).logits
    assert torch.equal(whole[:, PROMPT - 1 : -1].argmax(-1), reference[:, PROMPT:])
    # and the window matters: full causal attention over the same weights decodes otherwise
    causal = GPT(**{**vars(net.config), "sliding_window": None, "block_size": 256}).eval()
    causal.load_state_dict(net.state_dict())
    assert not torch.equal(causal.generate(ids, NEW, temperature=0), reference)

    # the cache holds the window only, and each step's logits are the whole sequence's
    cache = net.new_cache(2, PROMPT + NEW)
    assert isinstance(cache, RollingKVCache) and cache.k.shape[3] == WINDOW
    with torch.no_grad():
        steps = [net(reference[:, :PROMPT], cache=cache)[:, -1]]
        for t in range(PROMPT, PROMPT + NEW - 1):
            steps.append(net(reference[:, t : t + 1], cache=cache)[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), whole[:, PROMPT - 1 : -1], rtol=0, atol=1e-4)


def test_a_context_longer_than_the_window_masks_it_everywhere(mistral):
    """block_size beyond the window: the whole sequence at once (training's path), a plain
    cache and packed windows apply the sliding mask themselves."""
    model, net, folder = mistral
    wide = GPT(**{**hf.net_config(folder), "block_size": 128})
    hf.load_weights(wide, folder)
    wide.eval()
    ids = torch.randint(0, 96, (2, PROMPT), generator=torch.Generator().manual_seed(2))
    reference = theirs(model, ids)
    with torch.no_grad():
        whole = model(reference, use_cache=False).logits
        torch.testing.assert_close(wide(reference), whole, rtol=0, atol=1e-4)
        one_document = torch.zeros_like(reference)
        torch.testing.assert_close(wide(reference, documents=one_document), whole, rtol=0,
                                   atol=1e-4)  # fmt: skip
    assert not isinstance(wide.new_cache(2, PROMPT + NEW), RollingKVCache)  # within block_size
    assert torch.equal(wide.generate(ids, NEW, temperature=0), reference)


def test_a_window_needs_rotary_positions():
    from bigmodel.errors import UserError

    with pytest.raises(UserError, match="sliding_window=8 needs positions=rotary"):
        GPT(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16, sliding_window=8)


def test_the_window_is_written_by_mistral_alone(mistral):
    """export.py format=hf: a Mistral's config.json says its window; a family whose class has
    none refuses the net in one line naming it."""
    from bigmodel.errors import UserError

    _, net, _ = mistral
    assert hf.check_expressible(hf.family_for(net), net.config)["sliding_window"] == WINDOW
    llama = GPT(**{**vars(net.config), "family": "llama"})
    with pytest.raises(UserError, match=f"model.net.sliding_window={WINDOW} cannot be written"):
        hf.export_hf(llama, "unused")
