"""Hugging Face checkpoints of every supported family in and out of our decoder, checked against
`transformers` itself: logits within 1e-4 in fp32 both ways and the same greedy continuation as
`generate(do_sample=False)`, tied and untied heads, MHA, GQA and MQA, Llama 3 rope scaling, QK-norm
and q/k/v biases.

The models are small random ones the tests build with transformers' own config classes and
`save_pretrained` (nothing is downloaded), every weight drawn at random (norms and biases too) so
that a mapping mistake shows; the tokenizer is a small BPE trained here and saved as a
`PreTrainedTokenizerFast`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bigmodel.errors import UserError
from bigmodel.nets import GPT
from bigmodel.pretrained import hf
from tests.conftest import run_cli, run_dirs
from tests.test_pretrained import corpus, write_text

transformers = pytest.importorskip("transformers")

SIZES = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
# name -> (config class, its settings): each case a family with the switches it has
CASES = {
    "llama-tied-gqa": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-untied-llama3-rope-biases": (
        "LlamaConfig",
        dict(
            num_key_value_heads=4,
            tie_word_embeddings=False,
            attention_bias=True,
            mlp_bias=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "llama-linear-rope-mqa": (
        "LlamaConfig",
        dict(num_key_value_heads=1, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ),
    "qwen2-mqa": ("Qwen2Config", dict(num_key_value_heads=1, tie_word_embeddings=False)),
    "qwen3-tied-head-dim": (
        "Qwen3Config",
        dict(num_key_value_heads=2, head_dim=12, tie_word_embeddings=True, rope_theta=1e6),
    ),
    "mistral-gqa": ("MistralConfig", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    # a window shorter than the context: ours is capped there, where attention is still causal
    "mistral-sliding-window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=16)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
}


CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def tokenizer(vocab: int = 200):
    """A byte-level BPE trained on a few lines, as transformers saves a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(20_000).splitlines(), trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_model(
    folder: Path, case: str, seed: int = 0, extra_vocab: int = 3, positions: int | None = None
) -> Path:
    """A random model of `case` saved by transformers, with its tokenizer, in `folder`
    (`positions`: its context, if not the default 64)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    tok.save_pretrained(folder)
    cls, settings = CASES[case]
    sizes = {} if cls == "GPT2Config" else SIZES
    if positions is not None:
        key = "n_positions" if cls == "GPT2Config" else "max_position_embeddings"
        settings = {**settings, key: positions}
        sizes = {k: v for k, v in sizes.items() if k != key}
    config = getattr(transformers, cls)(
        vocab_size=len(tok) + extra_vocab,  # rows past the tokenizer, as real models pad theirs
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **sizes,
        **settings,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # every tensor random: biases and norms too
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    model.save_pretrained(folder)
    return folder


def hf_model(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def ours(folder: Path) -> GPT:
    net = GPT(**hf.net_config(folder))
    hf.load_weights(net, folder)
    return net.eval()


def random_ids(vocab: int, shape=(2, 24), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def greedy_matches(net: GPT, model, idx: torch.Tensor, n: int = 10) -> bool:
    mine = net.generate(idx, n, temperature=0)
    theirs = model.generate(
        idx,
        attention_mask=torch.ones_like(idx),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )
    return torch.equal(mine, theirs)


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers_both_ways(tmp_path, case):
    folder = write_model(tmp_path / "in", case)
    model = hf_model(folder)
    # in: their weights in our net
    net = ours(folder)
    assert net.config.family == model.config.model_type
    if "sliding" in case:
        assert net.config.block_size == 16  # the window, not max_position_embeddings (64)
    idx = random_ids(net.config.vocab_size, (2, min(24, net.config.block_size)))
    with torch.no_grad():
        diff_in = (net(idx) - model(idx).logits).abs().max().item()
    assert greedy_matches(net, model, idx[:, :6])
    # out: a net of ours, randomised the same way, written and read back by transformers
    torch.manual_seed(1)
    mine = GPT(**hf.net_config(folder)).eval()
    with torch.no_grad():
        for p in mine.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    hf.export_hf(mine, tmp_path / "out", tokenizer=_tok(folder))
    back = hf_model(tmp_path / "out")
    assert type(back).__name__ == type(model).__name__
    with torch.no_grad():
        diff_out = (mine(idx) - back(idx).logits).abs().max().item()
    assert greedy_matches(mine, back, idx[:, :6])
    print(f"parity {case}: in {diff_in:.2e}, out {diff_out:.2e}; greedy equal")
    assert diff_in < 1e-4 and diff_out < 1e-4


def _tok(folder: Path):
    from bigmodel.data.tokenizers import BPETokenizer

    return BPETokenizer.from_folder(folder)


# ------------------------------------------------------------------------ through the CLI
@pytest.mark.parametrize(
    ("case", "lora"),
    [
        ("qwen3-tied-head-dim", []),
        pytest.param("mistral-gqa", [], marks=pytest.mark.slow),
        pytest.param("llama-tied-gqa", ["model.lora.rank=4"], marks=pytest.mark.slow),
    ],
    ids=["qwen3", "mistral", "llama-lora"],
)
def test_finetune_any_family_then_export_it_back(tmp_path, case, lora):
    """experiment=finetune takes the family and sizes from the folder and tokenizes with its
    tokenizer; export.py format=hf writes a folder transformers loads as the same class, with the
    tokenizer (special tokens included) and the same logits. With LoRA (roles q and v, the
    llama config's default) the checkpoint holds the adapters alone and export merges them."""
    folder = write_model(tmp_path / "model", case)
    text = write_text(tmp_path / "corpus.txt", 20_000)
    run_cli(
        "train.py",
        "experiment=finetune",
        f"model.init_from={folder}",
        f"data.path={text}",
        "model.net.block_size=32",
        "data.batch_size=4",
        "data.max_eval_windows=4",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "scheduler.scheduler.warmup_steps=1",
        "optimizer.lr=1e-3",
        "callbacks.text_sample.max_new_tokens=4",
        *lora,
        cwd=tmp_path,
    )
    (run,) = run_dirs(tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    if lora:
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        assert sorted(saved) == sorted(
            f"net.blocks.{i}.attn.qkv.lora_{ab}.{r}" for i in range(2) for ab in "ab" for r in "qv"
        )
    from bigmodel.checkpoints import restore

    cfg, datamodule, task = restore(str(ckpt))
    assert cfg.model.net.family == hf_model(folder).config.model_type
    assert cfg.data.tokenizer == str(folder)
    out = tmp_path / "exported"
    run_cli("export.py", f"ckpt_path={ckpt}", "format=hf", f"out={out}", cwd=tmp_path)
    back, source = hf_model(out), hf_model(folder)
    assert type(back).__name__ == type(source).__name__
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == 32
    task.eval()
    idx = random_ids(cfg.model.net.vocab_size, (2, 16))
    with torch.no_grad():
        got = task.net(idx)
        assert (got - back(idx).logits).abs().max() < 1e-4
        assert (got - source(idx).logits).abs().max() > 1e-4  # it was trained
    if not lora:
        proc = run_cli(
            "export.py", f"ckpt_path={ckpt}", "format=peft", "out=p", cwd=tmp_path, check=False
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "format=peft writes LoRA adapters, and this checkpoint has none" in proc.stderr
    if lora and importlib.util.find_spec("peft"):  # the adapters alone, for peft over DIR
        import peft

        run_cli("export.py", f"ckpt_path={ckpt}", "format=peft", f"out={out}.peft", cwd=tmp_path)
        adapted = peft.PeftModel.from_pretrained(source, f"{out}.peft").eval()
        with torch.no_grad():
            assert (got - adapted(idx).logits).abs().max() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "</s>" and tok.bos_token == "<s>"
    assert tok.chat_template == CHAT_TEMPLATE
    sample = corpus(3000)[1000:1400]
    assert tok(sample, add_special_tokens=False)["input_ids"] == datamodule.tokenizer.encode(sample)


# ------------------------------------------------------------------------------ bad input
def unsupported(tmp_path: Path) -> Path:
    folder = write_model(tmp_path / "m", "llama-tied-gqa")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    return folder


def small_embedding(tmp_path: Path) -> Path:
    folder = write_model(tmp_path / "m", "qwen2-mqa", extra_vocab=-20)
    return folder


def missing_layer_weight(tmp_path: Path) -> Path:
    from safetensors.torch import load_file, save_file

    folder = write_model(tmp_path / "m", "mistral-gqa")
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize(
    ("make", "says"),
    [
        pytest.param(
            unsupported,
            "holds a gpt_neox model (",
            id="unsupported-architecture",
        ),
        pytest.param(
            small_embedding,
            "has 259 tokens, but its config.json has vocab_size=239: they belong to different",
            id="tokenizer-larger-than-embedding",
        ),
        pytest.param(
            missing_layer_weight,
            "lack model.layers.1.mlp.up_proj.weight; it is not a complete checkpoint",
            id="missing-layer-weight",
        ),
    ],
)
def test_bad_folder_is_one_line_and_exit_2(tmp_path, make, says):
    folder = make(tmp_path)
    text = write_text(tmp_path / "corpus.txt", 5_000)
    proc = run_cli(
        "train.py",
        "experiment=finetune",
        f"model.init_from={folder}",
        f"data.path={text}",
        "trainer.max_steps=1",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    if make is unsupported:
        assert "the supported model types are gpt2, llama, qwen2, qwen3, mistral" in errors[0]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"hidden_act": "gelu"}, "hidden_act=gelu is not supported"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "rope_parameters of rope_type yarn is not supported",
        ),
        ({"attention_dropout": 0.1}, "attention_dropout=0.1 is not supported"),
        (
            {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}},
            "partial_rotary_factor=0.5 is not supported",
        ),
    ],
)
def test_a_config_field_our_decoder_does_not_compute_is_refused(tmp_path, change, says):
    folder = write_model(tmp_path / "m", "llama-tied-gqa")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=None) as e:
        hf.net_config(folder)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_net_its_family_cannot_express_is_refused_on_export(tmp_path):
    net = GPT(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, family="llama")
    with pytest.raises(UserError, match="model.net.norm=layernorm cannot be written as a Hugging"):
        hf.export_hf(net, tmp_path / "out", tokenizer=_tok(write_model(tmp_path / "m", "gpt2")))


# ------------------------------------------------------------------------- LoRA by role
ROLES = ["q", "k", "v", "o", "gate", "up", "down"]


def test_lora_by_role_adapts_only_its_rows_and_exports_merged(tmp_path):
    """Each role of a fused layer gets its own adapter on its own rows (what an adapter on the
    family's separate q_proj, gate_proj, ... computes); the merged export is what transformers
    computes."""
    from bigmodel.pretrained.lora import LoRAConfig, apply_lora, count_trainable

    folder = write_model(tmp_path / "m", "qwen3-tied-head-dim")
    net = ours(folder)
    cfg = net.config
    idx = random_ids(cfg.vocab_size)
    apply_lora(net, LoRAConfig(rank=2, targets=ROLES))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_b" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    q, kv, H, C = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, 48, cfg.n_embd
    rows = {"q": q, "k": kv, "v": kv, "o": C, "gate": H, "up": H, "down": C}
    ins = {"q": C, "k": C, "v": C, "o": q, "gate": C, "up": C, "down": H}
    trainable, _ = count_trainable(net)
    assert trainable == cfg.n_layer * 2 * sum(rows[r] + ins[r] for r in ROLES)
    assert sorted(k for k in net.state_dict() if k.startswith("blocks.0.attn.qkv")) == [
        f"blocks.0.attn.qkv.lora_{ab}.{r}" for ab in "ab" for r in "kqv"
    ]
    hf.export_hf(net, tmp_path / "out", tokenizer=_tok(folder))
    with torch.no_grad():
        got = net(idx)
        assert (got - hf_model(tmp_path / "out")(idx).logits).abs().max() < 1e-4
    # v alone: the q and k rows of the fused projection keep their pretrained weights
    only_v = ours(folder)
    apply_lora(only_v, LoRAConfig(rank=2, targets=["v"]))
    qkv = only_v.blocks[0].attn.qkv
    with torch.no_grad():
        qkv.lora_b["v"].normal_()
    delta = qkv.delta()
    assert delta[: q + kv].abs().max() == 0 and delta[q + kv :].abs().max() > 0


def test_a_lora_role_the_family_lacks_is_one_line_and_exit_2(tmp_path):
    folder = write_model(tmp_path / "m", "gpt2")  # GPT-2's MLP has no gate
    text = write_text(tmp_path / "corpus.txt", 5_000)
    proc = run_cli(
        "train.py",
        "experiment=finetune",
        f"model.init_from={folder}",
        f"data.path={text}",
        "model.lora.rank=4",
        "model.lora.targets=[q,gate]",
        "trainer.max_steps=1",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and (
        "model.lora.targets: gate is no role of this model's blocks (it has q, k, v, o, up, down)"
        in errors[0]
    ), proc.stderr[-2000:]


# ------------------------------------------------------------------------------- PEFT out
@pytest.mark.parametrize(
    ("case", "targets"),
    [
        ("qwen3-tied-head-dim", ROLES),  # each role of a fused layer: its own adapter
        ("llama-untied-llama3-rope-biases", ["attn.qkv", "mlp.fc", "o"]),  # shared A, split B
        ("gpt2", ["q", "v", "mlp.proj"]),  # two roles in GPT-2's one c_attn: stacked ranks
    ],
    ids=["qwen3-roles", "llama-layers", "gpt2-roles"],
)
def test_lora_adapters_load_in_peft_over_their_base(tmp_path, case, targets):
    peft = pytest.importorskip("peft")
    from bigmodel.pretrained.lora import LoRAConfig, apply_lora
    from bigmodel.pretrained.peft_format import export_peft

    folder = write_model(tmp_path / "m", case)
    net = ours(folder)
    apply_lora(net, LoRAConfig(rank=2, alpha=6.0, targets=targets))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_b" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)

    class Run(torch.nn.Module):  # what export.py hands over: the net and its run's config
        def __init__(self):
            super().__init__()
            self.net = net
            self.run_config = {"model": {"init_from": str(folder), "lora": {"dropout": 0.0}}}

    export_peft(Run(), tmp_path / "adapter")
    model = peft.PeftModel.from_pretrained(hf_model(folder), tmp_path / "adapter").eval()
    idx = random_ids(net.config.vocab_size)
    with torch.no_grad():
        got = net.eval()(idx)
        diff = (got - model(idx).logits).abs().max().item()
        assert (got - hf_model(folder)(idx).logits).abs().max() > 1e-3  # the adapters count
    print(f"peft {case} {targets}: max |logit diff| {diff:.2e}")
    assert diff < 1e-4


def test_init_from_a_peft_adapter_folder_starts_from_its_base_with_the_adapters_merged(tmp_path):
    """model.init_from=ADAPTER_DIR (adapter_config.json over a base folder): the net is the base's,
    its weights the base's with the adapters merged, the text tokenized with the base's
    tokenizer."""
    from bigmodel.pretrained import load_base
    from bigmodel.pretrained.lora import LoRAConfig, apply_lora
    from bigmodel.pretrained.peft_format import export_peft

    folder = write_model(tmp_path / "base", "qwen2-mqa")
    net = ours(folder)
    apply_lora(net, LoRAConfig(rank=2, targets=["q", "v", "down"]))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.1)

    class Run(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.run_config = {"model": {"init_from": str(folder)}}

    export_peft(Run(), tmp_path / "adapter")
    fresh = GPT(**hf.net_config(folder))
    load_base({"init_from": str(tmp_path / "adapter")}, fresh)
    idx = random_ids(net.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(idx), net.eval()(idx), rtol=0, atol=1e-5)
    text = write_text(tmp_path / "corpus.txt", 5_000)
    run_cli(
        "train.py",
        "experiment=finetune",
        f"model.init_from={tmp_path / 'adapter'}",
        f"data.path={text}",
        "model.net.block_size=16",
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
        "data.max_eval_windows=2",
        "callbacks.text_sample.max_new_tokens=2",
        cwd=tmp_path,
    )
    (run,) = run_dirs(tmp_path)
    log = (run / "train.log").read_text()
    assert (
        f"with the PEFT adapters of {tmp_path / 'adapter'} merged (6 modules)" in log
    )  # q, v, down x 2 layers
