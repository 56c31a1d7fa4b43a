"""The GPT net: shapes, causality, weight tying, init, sizes, sampling; prompts and sampling
settings through the language-model task, the sample callback and generate.py."""

from __future__ import annotations

import pytest
import torch

from bigmodel.data.tokenizers import BPETokenizer, CharTokenizer
from bigmodel.errors import UserError
from bigmodel.nets import GPT, GPTConfig
from bigmodel.tasks import LanguageModel
from tests.conftest import TINY_LM, run_cli, run_dirs
from tests.test_text_data import PROSE


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


def test_cpu_half_precision_attention_runs_in_fp32_and_trains():
    """On a CPU, bf16 queries, keys and values are attended in fp32 (torch's bf16 CPU kernel
    is many times slower there); the result is the fp32 attention rounded once to bf16."""
    from bigmodel.nets.layers import Attention

    torch.manual_seed(0)
    attn = Attention(n_embd=32, n_head=2).bfloat16()  # as precision=bf16-true makes it
    q, k, v = (torch.randn(3, 2, 16, 16).bfloat16() for _ in range(3))  # (B, nh, T, hs)
    y = attn._mix(q, k, v, None, True)  # (B, T, C)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True
    ).bfloat16()
    ref = attn.proj(ref.transpose(1, 2).reshape(3, 16, 32))
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, ref)

    m = tiny()
    x = torch.randint(0, 50, (3, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(x)
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in m.parameters())


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


def test_temperature_zero_is_greedy_and_bad_settings_are_refused():
    m = tiny().eval()
    idx = torch.randint(0, 50, (2, 4))
    want = idx
    for _ in range(5):
        want = torch.cat([want, m(want)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(m.generate(idx, 5, temperature=0, top_k=7), want)
    for kwargs, match in [
        ({"temperature": -1}, r"^temperature=-1 must be >= 0; 0 decodes greedily"),
        ({"temperature": float("nan")}, r"^temperature=nan must be >= 0"),
        ({"top_k": 0}, r"^top_k=0 must be >= 1; top_k=null samples from all tokens"),
        ({"max_new_tokens": -1}, r"^max_new_tokens=-1 must be >= 0"),
    ]:
        with pytest.raises(UserError, match=match):
            m.generate(idx, **{"max_new_tokens": 3, **kwargs})


def lm(vocab_size: int) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(GPT(vocab_size=vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))


def greedy_from(model: LanguageModel, start: int, n: int) -> list[int]:
    return model.net.generate(torch.tensor([[start]]), n, temperature=0)[0, 1:].tolist()


@pytest.mark.parametrize("kind", ["char", "bpe", "char_without_newline"])
def test_empty_prompt_starts_from_a_newline(kind):
    text = PROSE.replace("\n", " ") if kind == "char_without_newline" else PROSE
    tok = BPETokenizer.train(text.splitlines(), 300) if kind == "bpe" else CharTokenizer.train(text)
    model = lm(tok.vocab_size)
    start = tok.encode(" " if kind == "char_without_newline" else "\n")
    assert len(start) == 1 and (kind != "bpe" or start != [0])  # BPE's id 0 is "!"
    (out,) = model.generate_text("", tok, max_new_tokens=12, temperature=0)
    assert out == tok.decode(greedy_from(model, start[0], 12))  # the start token is left out
    assert model.training  # restored after sampling


def test_empty_prompt_without_a_start_token_is_refused_and_prompts_are_strict():
    tok = CharTokenizer.train("abcab" * 10)
    model = lm(tok.vocab_size)
    with pytest.raises(
        UserError, match=r'^prompt="" starts from a newline or a space.*prompt="The"'
    ):
        model.generate_text("", tok, max_new_tokens=3)
    with pytest.raises(UserError, match="'z' is not in the character vocabulary"):
        model.generate_text("abz", tok, max_new_tokens=3)  # not the unknown id: refused
    with pytest.raises(UserError, match="num_samples=0 must be >= 1"):
        model.generate_text("ab", tok, num_samples=0)
    assert model.training


def test_sample_callback_without_its_prompt_character_keeps_training(tmp_path):
    """The default sample prompt is a newline; a corpus without one samples from a space."""
    corpus = tmp_path / "one_line.txt"
    corpus.write_text(PROSE.replace("\n", " "))
    assert "\n" not in corpus.read_text()
    proc = run_cli("train.py", *TINY_LM, f"data.path={corpus}", cwd=tmp_path)
    (run,) = run_dirs(tmp_path)
    assert proc.stdout.count("--- sample at step") == 2  # at steps 6 and 12
    assert (run / "metrics.json").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    log = (run / "train.log").read_text()
    assert "test/loss" in (run / "metrics.json").read_text()
    assert log.count("sampling from the empty prompt's start token instead") == 1  # warned once


def test_sample_callback_survives_a_diverged_model(tmp_path):
    """Non-finite logits cannot be sampled: the sample is skipped, with a warning."""
    # the loss guard off (a user's choice), so that the NaN reaches the weights and the sampler
    args = [
        *TINY_LM,
        "optimizer=adamw",
        "optimizer.lr=1e9",
        "callbacks.loss_guard=null",
        "test=false",
    ]
    proc = run_cli("train.py", *args, cwd=tmp_path)
    (run,) = run_dirs(tmp_path)
    assert "--- sample at step" not in proc.stdout
    assert "no text sample at this validation" in (run / "train.log").read_text()
    assert (run / "checkpoints" / "last.ckpt").is_file()


@pytest.fixture(scope="module")
def checkpoint(trained, tmp_path_factory):
    """The session's tiny LM run (conftest `trained`), and a folder to generate from."""
    return tmp_path_factory.mktemp("gpt"), trained("lm") / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("temperature=-1", "temperature=-1"),
        ("top_k=0", "top_k=0"),
        ("max_new_tokens=-5", "max_new_tokens=-5"),
    ],
)
def test_generate_refuses_bad_sampling_settings(checkpoint, setting, key):
    root, ckpt = checkpoint
    proc = run_cli("generate.py", f"ckpt_path={ckpt}", setting, cwd=root, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert proc.stderr.startswith(f"error: {key} must be >= ") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("setting", ["beam_size=2", "text=hello", "length_penalty=1.0"])
def test_generate_refuses_options_this_model_does_not_take(checkpoint, setting):
    """Translation options on a language model are refused in one line, not ignored."""
    root, ckpt = checkpoint
    proc = run_cli("generate.py", f"ckpt_path={ckpt}", setting, cwd=root, check=False)
    assert proc.returncode == 2, proc.stderr
    key = setting.partition("=")[0]
    assert proc.stderr.strip().splitlines() == [
        f"error: {key}: not an option of this model ({ckpt} is a LanguageModel); it takes "
        "prompt, max_new_tokens, temperature, top_k, top_p, stop, num_samples, seed"
    ]
    assert proc.stdout == ""


def test_generate_temperature_zero_and_empty_prompt(checkpoint):
    root, ckpt = checkpoint
    args = [f"ckpt_path={ckpt}", "max_new_tokens=30", "temperature=0"]
    # greedy: the seed changes nothing
    a = run_cli("generate.py", *args, "prompt=The", "seed=1", cwd=root).stdout
    assert a == run_cli("generate.py", *args, "prompt=The", "seed=2", cwd=root).stdout
    assert a.startswith("The") and len(a) == len("The") + 30 + 1  # the text and print's newline
    # prompt="" as a shell passes it: 30 new characters, no stand-in for the prompt before them
    out = run_cli("generate.py", *args, "prompt=", cwd=root).stdout
    assert len(out) == 30 + 1 and out.endswith("\n")
