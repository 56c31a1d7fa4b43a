"""Decoding from a key/value cache: the tokens transformers' generate gives, the tokens the
model gives without a cache, and a batch of prompts of different lengths decoded as each alone."""

from __future__ import annotations

import pytest
import torch

from bigmodel.nets import GPT
from bigmodel.sampling import generate, next_token
from tests.test_hf_families import CASES, hf_model, ours, random_ids, write_model

transformers = pytest.importorskip("transformers")

NEW = 256


def uncached(net: GPT):
    """The net as a plain function of token ids: every step runs the whole window again."""
    return lambda idx, **kw: net(idx, **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_from_the_cache_is_transformers_greedy(tmp_path, case):
    """256 new tokens (past a sliding window too: Mistral's rolls on), greedy, through the
    end-of-text token as any other (transformers is told no eos, and no minimum length, which
    would forbid it)."""
    folder = write_model(tmp_path / case, case, positions=NEW + 32)
    net, model = ours(folder), hf_model(folder)
    prompt, new = 16, NEW
    idx = random_ids(net.config.vocab_size, (2, prompt))
    mine = net.generate(idx, new, temperature=0)
    model.generation_config.eos_token_id = None
    theirs = model.generate(
        idx, attention_mask=torch.ones_like(idx), max_new_tokens=new, do_sample=False,
        pad_token_id=0,
    )  # fmt: skip
    assert mine.shape == (2, prompt + new)
    assert torch.equal(mine, theirs), (mine != theirs).nonzero()[:5]


@pytest.mark.parametrize("kind", ["learned", "rotary"])
def test_the_cache_gives_the_uncached_tokens_past_the_context_too(kind):
    """Greedy and seeded sampling alike, over more tokens than the context holds (the cache
    fills, then each step runs the last block_size ids, as without one)."""
    torch.manual_seed(0)
    extra = {"positions": "rotary", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 1}
    net = GPT(vocab_size=50, block_size=24, n_layer=2, n_head=2, n_embd=16,
              **(extra if kind == "rotary" else {})).eval()  # fmt: skip
    idx = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(1))
    for temperature in (0.0, 1.0):
        a = generate(net, idx, 60, 24, temperature, generator=torch.Generator().manual_seed(2))
        b = generate(uncached(net), idx, 60, 24, temperature,
                     generator=torch.Generator().manual_seed(2))  # fmt: skip
        assert torch.equal(a, b), temperature


@pytest.mark.parametrize("case", ["llama-tied-gqa", "gpt2"])
def test_a_left_padded_batch_decodes_each_prompt_as_alone(tmp_path, case):
    net = ours(write_model(tmp_path / case, case, positions=128))
    prompts = [random_ids(net.config.vocab_size, (1, n), seed=n)[0] for n in (3, 11, 7)]
    width = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), width, dtype=torch.long)
    pad_mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        idx[i, width - len(p) :], pad_mask[i, width - len(p) :] = p, True
    batched = generate(net, idx, 40, net.block_size, 0.0, pad_mask=pad_mask)
    for i, p in enumerate(prompts):
        alone = generate(net, p[None], 40, net.block_size, 0.0)
        assert torch.equal(batched[i, width:], alone[0, len(p) :]), i


def test_top_p_samples_only_from_the_nucleus():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits, -1)[0]
    # the nucleus for 0.8: the most likely tokens until their probability reaches 0.8
    order = probs.argsort(descending=True)
    nucleus, total = set(), 0.0
    for t in order.tolist():
        nucleus.add(t)
        total += probs[t].item()
        if total >= 0.8:
            break
    g = torch.Generator().manual_seed(0)
    drawn = {next_token(logits, 1.0, None, g, top_p=0.8).item() for _ in range(2000)}
    assert drawn == nucleus == {0, 1}
    assert next_token(logits, 1.0, None, g, top_p=1e-6).item() == 0  # only the most likely


def test_decoding_stops_when_every_row_has_emitted_eos():
    torch.manual_seed(0)
    net = GPT(vocab_size=20, block_size=64, n_layer=1, n_head=2, n_embd=16).eval()
    idx = torch.randint(0, 20, (2, 4), generator=torch.Generator().manual_seed(3))
    free = generate(net, idx, 30, 64, 0.0)
    eos = int(free[0, 6])  # the third token row 0 emits: make it the end of text
    out = generate(net, idx, 30, 64, 0.0, eos_id=eos)
    row0 = out[0, 4:].tolist()
    assert row0[: row0.index(eos) + 1] == free[0, 4 : 4 + row0.index(eos) + 1].tolist()
    assert all(t == eos for t in row0[row0.index(eos) :])  # finished: padded with eos
    assert out.shape[1] <= free.shape[1]


def test_the_cache_holds_only_the_key_value_heads():
    net = GPT(vocab_size=20, block_size=64, n_layer=3, n_head=8, n_embd=64, n_kv_head=2)
    cache = net.new_cache(batch=1, size=64)
    assert tuple(cache.k.shape) == (3, 1, 2, 64, 8)
    assert cache.bytes_per_token() == 2 * 3 * 2 * 8 * 4


def test_a_batch_of_requests_decodes_each_as_alone(trained):
    """serve.py's batches: prompts of different lengths and settings (greedy, seeded samples,
    top-k) decoded together give each request's text alone; a bad one is refused alone."""
    from bigmodel.deploy.bundle import from_checkpoint
    from bigmodel.deploy.inputs import BadInput
    from bigmodel.deploy.runtime import Runner

    runner = Runner(from_checkpoint(str(trained("lm") / "checkpoints" / "last.ckpt")))
    requests = [
        {"prompt": "The ", "max_new_tokens": 12, "temperature": 0.0, "top_k": None, "seed": None},
        {"prompt": "", "max_new_tokens": 5, "temperature": 0.9, "top_k": 5, "seed": 3},
        {"prompt": "And so it was", "max_new_tokens": 9, "temperature": 1.0, "top_k": None,
         "seed": 7},
        {"prompt": "日本", "max_new_tokens": 4, "temperature": 0.0, "top_k": None, "seed": None},
        {"prompt": "a", "max_new_tokens": 0, "temperature": 0.0, "top_k": None, "seed": None},
    ]  # fmt: skip
    together = runner.generate_many(requests)
    for req, text in zip(requests, together, strict=True):
        if req["prompt"] == "日本":
            assert isinstance(text, BadInput) and "not in the character vocabulary" in str(text)
            continue
        alone = runner.generate(
            req["prompt"], req["max_new_tokens"], req["temperature"], req["top_k"], req["seed"]
        )
        assert text == alone, (req, text, alone)


@pytest.mark.slow  # an ONNX export of three graphs
def test_onnx_runtime_decodes_from_its_cache_graphs_as_pytorch_does(trained, tmp_path):
    """export.py format=onnx writes prefill and decode-step graphs, the cache as their inputs
    and outputs; ONNX Runtime decodes with them the tokens PyTorch does, past the context
    too (64 new tokens of a 32-token model), and an older folder with the whole-window graph
    alone still decodes the same."""
    from bigmodel.deploy.bundle import from_checkpoint, from_folder
    from bigmodel.deploy.runtime import Runner
    from tests.conftest import run_cli

    ckpt = trained("lm") / "checkpoints" / "last.ckpt"
    run_cli("export.py", f"ckpt_path={ckpt}", "format=onnx", "out=onnx", cwd=tmp_path)
    folder = tmp_path / "onnx"
    assert {"model.onnx", "prefill.onnx", "decode_step.onnx"} <= {p.name for p in folder.iterdir()}
    cached = Runner(from_folder(str(folder)), "onnx")
    assert {"prefill", "decode_step"} <= set(cached.sessions)
    reference = Runner(from_checkpoint(str(ckpt)), "torch")
    # step by step, each token's logits over the cache are the whole prefix's in PyTorch
    from bigmodel.deploy.runtime import OnnxCachedDecoder

    net = reference.bundle.net
    ids = torch.tensor([reference.encode_prompt("It was the best of times, it was")])  # (1, T)
    decoder = OnnxCachedDecoder(cached.sessions, cached.all_logits)
    cache = decoder.new_cache(1, ids.shape[1])
    for t in range(4, ids.shape[1]):
        step = decoder(ids[:, :4] if t == 4 else ids[:, t - 1 : t], cache=cache)[:, -1]
        with torch.no_grad():
            want = net(ids[:, :t])[:, -1]
        torch.testing.assert_close(step, want, rtol=1e-4, atol=1e-4)
    for prompt in ("The ", ""):
        for temperature, seed in ((0.0, None), (1.0, 3)):
            want = reference.generate(prompt, 64, temperature=temperature, seed=seed)
            assert cached.generate(prompt, 64, temperature=temperature, seed=seed) == want
    for name in ("prefill.onnx", "decode_step.onnx"):
        (folder / name).unlink()
    window = Runner(from_folder(str(folder)), "onnx")
    assert set(window.sessions) == {"model"}
    assert window.generate("The ", 64, temperature=0) == reference.generate("The ", 64, 0)


def test_generate_py_takes_top_p_and_stop_texts(trained, tmp_path):
    """A nucleus small enough to hold one token samples the greedy text; a stop text ends the
    continuation before it; a top_p out of range is one line."""
    from tests.conftest import run_cli

    ckpt = f"ckpt_path={trained('lm') / 'checkpoints' / 'last.ckpt'}"
    args = [ckpt, "prompt=The", "max_new_tokens=30"]
    greedy = run_cli("generate.py", *args, "temperature=0", cwd=tmp_path).stdout
    nucleus = run_cli("generate.py", *args, "temperature=1", "top_p=1e-6", cwd=tmp_path).stdout
    assert nucleus == greedy
    cut = greedy[3:].strip("\n")[:2]  # the first two generated characters
    assert len(cut) == 2
    stopped = run_cli("generate.py", *args, "temperature=0", f"stop=['{cut}']", cwd=tmp_path)
    assert stopped.stdout.rstrip("\n") == greedy[: 3 + greedy[3:].find(cut)].rstrip("\n")
    bad = run_cli("generate.py", *args, "top_p=2", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "top_p=2" in bad.stderr and "must be in (0, 1]" in bad.stderr
