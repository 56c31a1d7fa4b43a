"""The one configurable decoder (bigmodel.nets.GPT): GPT-2's checkpoints written before it still
compute the same, its switches are checked, and the Llama-style preset trains.

tests/data/gpt_main_2ca9327.ckpt is a char-level GPT (1 layer, 16 wide, biases) that train.py of
commit 2ca9327 wrote before the decoder became configurable, with its logits and greedy ids of
that time (gpt_main_2ca9327.expected.pt).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from bigmodel.errors import UserError
from bigmodel.nets import GPT
from bigmodel.nets.gpt import GPTConfig, inv_frequencies
from tests.conftest import TINY_LM, run_cli, run_dirs

DATA = Path(__file__).parent / "data"
OLD = DATA / "gpt_main_2ca9327.ckpt"
# the model.net of that checkpoint, for resuming it from the command line
OLD_NET = [
    "model.net.n_layer=1",
    "model.net.n_head=2",
    "model.net.n_embd=16",
    "model.net.block_size=16",
    "model.net.bias=true",
]


def old_net() -> tuple[GPT, dict]:
    ckpt = torch.load(OLD, map_location="cpu", weights_only=True)
    fields = dict(ckpt["bigmodel"]["config"]["model"]["net"])
    fields.pop("_target_")
    net = GPT(**fields).eval()
    net.load_state_dict({k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")})
    return net, torch.load(DATA / "gpt_main_2ca9327.expected.pt", weights_only=True)


def test_a_checkpoint_of_the_gpt_before_computes_the_same():
    net, want = old_net()
    with torch.no_grad():
        assert torch.equal(net(want["idx"]), want["logits"])  # bit for bit
    assert torch.equal(net.generate(want["idx"][:, :4], 8, temperature=0), want["greedy"])


def test_a_checkpoint_of_the_gpt_before_evaluates_and_generates(tmp_path):
    ckpt = tmp_path / "old.ckpt"
    shutil.copy(OLD, ckpt)
    out = run_cli("eval.py", f"ckpt_path={ckpt}", cwd=tmp_path).stdout
    assert "test/loss: 4.60175" in out  # what train.py of 2ca9327 reported
    gen = run_cli(
        "generate.py",
        f"ckpt_path={ckpt}",
        "prompt=def",
        "max_new_tokens=8",
        "temperature=0",
        cwd=tmp_path,
    )
    assert gen.stdout.startswith("def")


@pytest.mark.slow  # an export that transformers loads, and a training run
def test_a_checkpoint_of_the_gpt_before_exports_and_resumes(tmp_path):
    ckpt = tmp_path / "old.ckpt"
    shutil.copy(OLD, ckpt)
    run_cli("export.py", f"ckpt_path={ckpt}", "format=hf", f"out={tmp_path / 'hf'}", cwd=tmp_path)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    _, want = old_net()
    with torch.no_grad():
        assert (hf(want["idx"]).logits - want["logits"]).abs().max() < 1e-5
    run_cli(
        "train.py",
        "model=gpt",  # the default of train.py then, model=speedrun now
        f"ckpt_path={ckpt}",
        "trainer.max_steps=5",
        "data.batch_size=4",
        "data.max_eval_windows=4",
        "trainer.val_check_interval=5",
        "callbacks.text_sample.max_new_tokens=4",
        *OLD_NET,
        cwd=tmp_path,
    )
    (run,) = run_dirs(tmp_path)
    log = (run / "train.log").read_text()
    assert "resuming at step 3" in log, log[-2000:]


# --------------------------------------------------------------------------- the switches
@pytest.mark.parametrize(
    ("fields", "says"),
    [
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "model.net.rope_scaling: rope_type yarn",
        ),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks low_freq_factor"),
        ({"n_kv_head": 3}, "model.net.n_kv_head=3 must divide model.net.n_head=4"),
        ({"norm": "batchnorm"}, "model.net.norm=batchnorm is not one of layernorm, rmsnorm"),
        ({"mlp": "geglu"}, "model.net.mlp=geglu is not one of gelu, gelu_tanh, swiglu, relu2"),
    ],
)
def test_a_setting_the_decoder_does_not_compute_is_refused(fields, says):
    with pytest.raises(UserError, match=None) as e:
        GPTConfig(vocab_size=10, n_head=4, n_embd=16, positions="rotary", **fields)
    assert says in str(e.value)


def test_llama3_frequency_scaling_slows_only_long_wavelengths():
    base = GPTConfig(n_head=1, n_embd=128, positions="rotary", rope_theta=500000.0)
    scaling = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    scaled = GPTConfig(**{**base.__dict__, "rope_scaling": scaling})
    a, b = inv_frequencies(base), inv_frequencies(scaled)
    wavelen = 2 * torch.pi / a
    short, long = wavelen < 8192 / 4, wavelen > 8192
    assert torch.equal(a[short], b[short]) and short.any()
    torch.testing.assert_close(a[long] / 32, b[long])
    assert long.any() and (b <= a).all()


def test_grouped_query_attention_is_attention_with_shared_key_value_heads():
    """n_kv_head=1 (MQA) computes what MHA does with every key/value head a copy of the one."""
    torch.manual_seed(0)
    kw = dict(vocab_size=11, block_size=8, n_layer=1, n_head=4, n_embd=16, positions="rotary")
    mqa, mha = GPT(**kw, n_kv_head=1).eval(), GPT(**kw).eval()
    state = mqa.state_dict()
    q, k, v = state["blocks.0.attn.qkv.weight"].split([16, 4, 4])
    state["blocks.0.attn.qkv.weight"] = torch.cat([q, k.repeat(4, 1), v.repeat(4, 1)])
    state["blocks.0.attn.qkv.bias"] = torch.zeros(48)
    mha.load_state_dict(state)
    idx = torch.randint(0, 11, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(mqa(idx), mha(idx))


def test_zero_init_starts_each_block_as_the_identity_and_the_logits_uniform():
    """zero_init: residual projections and an untied head are zero, nothing else changes."""
    kw = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, bias=False)
    kw.update(positions="rotary", norm="rmsnorm")
    torch.manual_seed(0)
    zero = GPT(**kw, zero_init=True, tie_embeddings=False, mlp="relu2", qk_norm=True).eval()
    torch.manual_seed(0)
    plain = GPT(**kw, tie_embeddings=False, mlp="relu2", qk_norm=True).eval()
    zeroed = {k for k, v in zero.state_dict().items() if not v.any()}
    assert zeroed == {
        "lm_head.weight",
        *(f"blocks.{i}.{m}.proj.weight" for i in (0, 1) for m in ("attn", "mlp")),
    }, zeroed
    for k, v in plain.state_dict().items():  # the same draws for every other weight
        if k not in zeroed:
            assert torch.equal(v, zero.state_dict()[k]), k
    idx = torch.randint(0, 11, (2, 8))
    with torch.no_grad():
        assert not zero(idx).any()  # uniform: the first loss is log(vocab_size)
        h = zero.wte(idx)
        assert torch.equal(zero.blocks[0](h, zero.rope(8, h.device, h.dtype)), h)
    # a tied head is the embedding, which keeps its draw
    tied = GPT(**kw, zero_init=True)
    assert tied.lm_head.weight.any() and not tied.blocks[0].mlp.proj.weight.any()


def test_model_llama_trains_on_the_embedded_corpus(tmp_path):
    run_cli("train.py", "model=llama", *TINY_LM, "model.net.n_kv_head=1", cwd=tmp_path)
    (run,) = run_dirs(tmp_path)
    from bigmodel.checkpoints import restore

    cfg, _, task = restore(str(run / "checkpoints" / "last.ckpt"))
    net = task.net
    assert cfg.model.net.family == "llama" and not hasattr(net, "wpe")
    assert isinstance(net.blocks[0].ln_1, torch.nn.RMSNorm)
    assert net.blocks[0].attn.qkv.out_features == 32 + 2 * 16  # 2 query heads, 1 kv head of 16
