"""Hugging Face GPT-2 in and out: `model.init_from=DIR` sizes and fills our GPT from a folder
that `transformers` wrote, the text data tokenizes with its tokenizer, and `export_hf` writes a
folder `GPT2LMHeadModel` and the HF tokenizer load back, with the same logits.

The checkpoints are small random GPT-2s the tests build with `transformers` (no download); every
weight, biases and norms included, is drawn at random so that a mapping mistake shows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from bigmodel.checkpoints import restore
from bigmodel.data.tokenizers import BPETokenizer
from bigmodel.nets import GPT
from bigmodel.pretrained import hf
from tests.conftest import ROOT, run_cli, run_dirs

transformers = pytest.importorskip("transformers")

# a short fine-tuning run: sizes and steps shortened, every callback and print kept
SHORT = [
    "model.net.block_size=32",
    "data.batch_size=4",
    "data.max_eval_windows=4",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "scheduler.scheduler.warmup_steps=2",
    "callbacks.text_sample.max_new_tokens=8",
    "callbacks.throughput.window_size=2",
]


def corpus(n: int = 40_000) -> str:
    from pydoc_data.topics import topics

    return "".join(topics.values())[:n]


def write_text(path: Path, n: int = 40_000) -> Path:
    path.write_text(corpus(n), encoding="utf-8")
    return path


def write_gpt2(
    folder: Path,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 32,
    n_positions: int = 64,
    vocab: int = 320,
    eps: float = 1e-5,
    tokenizer: str = "json",
    weights: str = "safetensors",
    seed: int = 0,
) -> Path:
    """A random GPT-2 saved by `transformers`, with a byte-level BPE tokenizer trained here:
    tokenizer.json, or vocab.json + merges.txt (tokenizer="files")."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = BPETokenizer.train(
        corpus().splitlines(), vocab_size=vocab, special_tokens=["<|endoftext|>"]
    )
    if tokenizer == "json":
        tok.tok.save(str(folder / "tokenizer.json"))
    else:
        tok.tok.model.save(str(folder))
    config = transformers.GPT2Config(
        vocab_size=tok.vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        layer_norm_epsilon=eps,
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=tok.token_to_id("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # every tensor random: biases and norms too
        for p in model.parameters():
            p.copy_(
                torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 and p.shape[0] == n_embd else 0)
            )
    if weights == "safetensors":
        model.save_pretrained(folder)
    else:  # an older layout: a pickle of the state dict, tied head included
        config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def hf_logits(folder: Path, idx: torch.Tensor) -> torch.Tensor:
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(idx).logits


def ours(folder: Path) -> GPT:
    net = GPT(**hf.net_config(folder))
    hf.load_weights(net, folder)
    return net.eval()


# ------------------------------------------------------------------------------------- in
@pytest.mark.parametrize(
    ("weights", "eps"), [("safetensors", 1e-5), ("bin", 1e-3)], ids=["safetensors", "bin"]
)
def test_logits_match_transformers(tmp_path, weights, eps):
    folder = write_gpt2(tmp_path / "gpt2", n_layer=3, weights=weights, eps=eps)
    net = ours(folder)
    assert net.config.n_layer == 3 and net.config.layer_norm_epsilon == eps
    assert net.blocks[0].ln_1.eps == eps
    idx = torch.randint(
        0, net.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        got = net(idx)
    want = hf_logits(folder, idx)
    diff = (got - want).abs().max().item()
    print(f"parity in ({weights}): max |logit difference| = {diff:.2e}")
    assert diff < 1e-4


def test_tokenizer_from_vocab_and_merges_matches_tokenizer_json(tmp_path):
    a = write_gpt2(tmp_path / "a", tokenizer="json")
    b = write_gpt2(tmp_path / "b", tokenizer="files")
    text = corpus(2000)
    ids = BPETokenizer.from_folder(a).encode(text)
    assert BPETokenizer.from_folder(b).encode(text) == ids
    slow = transformers.GPT2Tokenizer(str(b / "vocab.json"), str(b / "merges.txt"))
    assert slow(text)["input_ids"] == ids
    assert BPETokenizer.from_folder(b).decode(ids) == text


# ------------------------------------------------------------------------------- through
def test_finetune_from_a_gpt2_folder_then_export_it_back(tmp_path):
    """train.py starts from the folder (sized by it, tokenized with its tokenizer, its weights),
    export_hf (and export.py format=hf) write a folder transformers loads with the same logits
    and tokens, eval.py and generate.py take the fine-tuned checkpoint."""
    folder = write_gpt2(tmp_path / "gpt2", n_layer=2)
    text = write_text(tmp_path / "corpus.txt")
    t0 = time.perf_counter()
    proc = run_cli(
        "train.py",
        "experiment=finetune_gpt2",
        f"model.init_from={folder}",
        f"data.path={text}",
        *SHORT,
        cwd=tmp_path,
    )
    (run,) = run_dirs(tmp_path)
    log = (run / "train.log").read_text()
    assert f"model.init_from: gpt2 weights from {folder}" in log
    ckpt_path = run / "checkpoints" / "last.ckpt"
    cfg, datamodule, task = restore(str(ckpt_path))
    assert cfg.model.net.n_layer == 2 and cfg.model.net.n_embd == 32
    assert cfg.data.tokenizer == str(folder)
    assert datamodule.tokenizer.to_dict() == BPETokenizer.from_folder(folder).to_dict()
    # the weights moved from the pretrained ones
    pretrained = ours(folder)
    assert not torch.equal(task.net.blocks[0].attn.qkv.weight, pretrained.blocks[0].attn.qkv.weight)
    print(f"fine-tuning CLI run: {time.perf_counter() - t0:.1f} s; {proc.stdout[-300:]}")

    out = tmp_path / "hf"
    hf.export_hf(task, out)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    mode = (out / "model.safetensors").stat().st_mode & 0o777
    assert mode == (out / "config.json").stat().st_mode & 0o777, oct(mode)  # not 0600
    task.eval()
    idx = torch.randint(
        0, cfg.model.net.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        got = task.net(idx)
    diff = (got - hf_logits(out, idx)).abs().max().item()
    print(f"parity out: max |logit difference| = {diff:.2e}")
    assert diff < 1e-4
    sample = corpus(3000)[1000:]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(sample)["input_ids"] == datamodule.tokenizer.encode(sample)
    assert json.loads((out / "config.json").read_text())["n_positions"] == 32

    if (ROOT / "export.py").exists():  # the same through the command line
        run_cli(
            "export.py",
            f"ckpt_path={ckpt_path}",
            "format=hf",
            f"out={tmp_path / 'cli'}",
            cwd=tmp_path,
        )
        assert (hf_logits(tmp_path / "cli", idx) - got).abs().max() < 1e-4
    # a fully fine-tuned checkpoint holds every weight and the tokenizer: the folder may go
    folder.rename(tmp_path / "moved")
    metrics = run_cli("eval.py", f"ckpt_path={ckpt_path}", cwd=tmp_path).stdout
    assert "test/loss" in metrics
    gen = run_cli(
        "generate.py", f"ckpt_path={ckpt_path}", "prompt=The", "max_new_tokens=5", cwd=tmp_path
    )
    assert gen.stdout.startswith("The")


def test_export_a_char_model_trained_from_scratch(tmp_path):
    """A net without biases, with a char vocabulary: zero biases and a one-char-per-token
    tokenizer make the same function and ids in transformers."""
    from bigmodel.data.tokenizers import CharTokenizer
    from bigmodel.tasks import LanguageModel

    torch.manual_seed(0)
    text = corpus(5000)
    tok = CharTokenizer.train(text)
    net = GPT(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, bias=False)
    task = LanguageModel(net).eval()
    hf.export_hf(task, tmp_path / "hf", tokenizer=tok)
    idx = torch.tensor([tok.encode(text[:16])])
    with torch.no_grad():
        assert (net(idx) - hf_logits(tmp_path / "hf", idx)).abs().max() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sample = "def f(x):\n    return x  # \u00e9"
    assert hf_tok(sample)["input_ids"] == tok.encode(sample)
    assert hf_tok.decode(tok.encode("def f(x):\n")) == "def f(x):\n"


# ------------------------------------------------------------------------------ bad input
def not_gpt2(tmp_path: Path) -> Path:
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return tmp_path / "bert"


def no_weights(tmp_path: Path) -> Path:
    folder = write_gpt2(tmp_path / "gpt2", n_layer=1)
    (folder / "model.safetensors").unlink()
    return folder


def other_vocab(tmp_path: Path) -> Path:
    folder = write_gpt2(tmp_path / "gpt2", n_layer=1)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    return folder


def empty(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


SLOW = pytest.mark.slow  # each loads torch in a new process: two stay in the fast suite


@pytest.mark.parametrize(
    ("make", "args", "says"),
    [
        pytest.param(
            empty,
            [],
            "has no config.json, so it is no Hugging Face model folder; model.init_from takes a "
            "Hugging Face folder of a decoder (gpt2, llama, qwen2, qwen3, mistral",
            id="empty-folder",
            marks=SLOW,
        ),
        pytest.param(
            not_gpt2,
            [],
            "holds a bert model (",
            id="not-gpt2",
            marks=SLOW,
        ),
        pytest.param(
            no_weights,
            [],
            "has config.json but no weights: put model.safetensors or pytorch_model.bin in it",
            id="no-weights",
        ),
        pytest.param(
            other_vocab,
            [],
            "has 320 tokens, but its config.json has vocab_size=100: they belong to different "
            "models",
            id="vocab",
            marks=SLOW,
        ),
        pytest.param(
            None,
            ["model.init_from=nowhere"],
            "model.init_from=nowhere does not exist",
            id="missing",
            marks=SLOW,
        ),
        pytest.param(
            None,
            ["model.lora.rank=4"],
            "model.lora.rank=4 trains adapters on pretrained weights: set model.init_from",
            id="lora-without-base",
            marks=SLOW,
        ),
        pytest.param(
            None,
            ["model=cnn", "data=digits", "model.lora.rank=4"],
            "model.lora.rank=4: LoRA adapts the decoder only (model=gpt, llama and their "
            "presets), and this model's net is bigmodel.nets.CNN",
            id="lora-on-cnn",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, make, args, says):
    argv = list(args)
    if make is not None:
        argv.append(f"model.init_from={make(tmp_path)}")
    proc = run_cli("train.py", "model=gpt2_124m", *argv, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
