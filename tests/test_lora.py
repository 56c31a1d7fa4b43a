"""LoRA on a pretrained GPT-2: only the adapters train and are saved, the frozen base is read
again from `model.init_from`, and export merges them (checked against transformers)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hydra.utils import instantiate

from bigmodel.checkpoints import restore
from bigmodel.errors import UserError
from bigmodel.pretrained import build_net, hf, merge_lora
from bigmodel.pretrained.lora import LoRAConfig, LoRALinear, apply_lora, count_trainable
from tests.conftest import run_cli, run_dirs
from tests.test_pretrained import SHORT, hf_logits, ours, write_gpt2, write_text

pytest.importorskip("transformers")

LORA = ["model.lora.rank=4", "model.lora.targets=[attn.qkv,mlp.fc]", "optimizer.lr=1e-2"]


def randomise_adapters(net: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.1)


def test_adapted_net_equals_its_merged_net_and_its_export(tmp_path):
    folder = write_gpt2(tmp_path / "gpt2")
    net = ours(folder)
    idx = torch.randint(
        0, net.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        base = net(idx)
    adapted = apply_lora(
        net, LoRAConfig(rank=4, alpha=8, targets=["attn.qkv", "attn.proj", "mlp.proj"])
    )
    assert len(adapted) == 3 * net.config.n_layer
    with torch.no_grad():  # lora_b starts at zero: the pretrained function
        torch.testing.assert_close(net(idx), base, rtol=0, atol=0)
    randomise_adapters(net)
    trainable, total = count_trainable(net)
    # per block: qkv (32 -> 96), attn.proj (32 -> 32), mlp.proj (128 -> 32), rank 4
    assert trainable == net.config.n_layer * 4 * ((32 + 96) + (32 + 32) + (128 + 32))
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {
        f"blocks.{i}.{t}.lora_{ab}"
        for i in range(net.config.n_layer)
        for t in ("attn.qkv", "attn.proj", "mlp.proj")
        for ab in "ab"
    }
    with torch.no_grad():
        got = net(idx)
        assert (got - base).abs().max() > 1e-2  # the adapters change the function
        merged = merge_lora(copy.deepcopy(net))
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(idx), got, rtol=0, atol=1e-5)
    # the state dict holds the adapters alone, and loads back into a fresh adapted net
    state = net.state_dict()
    assert set(state) == {n for n, p in net.named_parameters() if p.requires_grad}
    again = ours(folder)
    apply_lora(again, LoRAConfig(rank=4, alpha=8, targets=["attn.qkv", "attn.proj", "mlp.proj"]))
    again.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(again(idx), got, rtol=0, atol=0)
    hf.export_hf(net, tmp_path / "hf", tokenizer=hf.check_tokenizer(folder, 10**6))
    assert (hf_logits(tmp_path / "hf", idx) - got).abs().max() < 1e-4


def test_unknown_target_is_refused(tmp_path):
    net = ours(write_gpt2(tmp_path / "gpt2", n_layer=1))
    with pytest.raises(
        UserError,
        match="attn.q is no Linear layer of the blocks; choose from attn.proj, attn.qkv, mlp.fc,",
    ):
        apply_lora(net, LoRAConfig(rank=2, targets=["attn.q"]))


@pytest.mark.slow  # three CLI runs
def test_lora_run_saves_adapters_only_and_restores_on_its_base(tmp_path):
    folder = write_gpt2(tmp_path / "gpt2")
    text = write_text(tmp_path / "corpus.txt")
    run_cli(
        "train.py",
        "experiment=finetune_gpt2",
        f"model.init_from={folder}",
        f"data.path={text}",
        *SHORT,
        *LORA,
        cwd=tmp_path,
    )
    (run,) = run_dirs(tmp_path)
    log = (run / "train.log").read_text()
    # per block: rank 4 x ((32 + 96) qkv + (32 + 128) fc)
    assert (
        "LoRA rank 4 (alpha 16) on 4 layers (attn.qkv, mlp.fc): 2,304 trainable parameters" in log
    )
    ckpt_path = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert sorted(ckpt["state_dict"]) == sorted(
        f"net.blocks.{i}.{t}.lora_{ab}"
        for i in range(2)
        for t in ("attn.qkv", "mlp.fc")
        for ab in "ab"
    )
    # the optimizer state covers the adapters only
    assert len(ckpt["optimizer_states"][0]["state"]) == 8
    cfg, datamodule, task = restore(str(ckpt_path))
    pretrained = ours(folder)
    # the base is the pretrained one, untouched; the adapters trained
    torch.testing.assert_close(
        task.net.blocks[1].mlp.fc.weight, pretrained.blocks[1].mlp.fc.weight, rtol=0, atol=0
    )
    torch.testing.assert_close(task.net.wte.weight, pretrained.wte.weight, rtol=0, atol=0)
    assert task.net.blocks[0].attn.qkv.lora_b.abs().max() > 0
    task.eval()
    idx = torch.randint(
        0, cfg.model.net.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        got = task.net(idx)
    hf.export_hf(task, tmp_path / "hf")
    assert (hf_logits(tmp_path / "hf", idx) - got).abs().max() < 1e-4
    # for inference: the checkpoint's net alone, base from init_from, adapters merged
    net_state = {k[4:]: v for k, v in ckpt["state_dict"].items()}
    plain = build_net(
        ckpt["bigmodel"]["config"]["model"], net_state, lambda c: instantiate(c, _convert_="all")
    ).eval()
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(idx), got, rtol=0, atol=1e-5)
    # eval.py and generate.py rebuild the base from model.init_from too
    assert "test/loss" in run_cli("eval.py", f"ckpt_path={ckpt_path}", cwd=tmp_path).stdout
    # predict.py (and serve.py, on the same loader) merge the adapters into the base as well:
    # its greedy text is generate.py's
    greedy = ["max_new_tokens=12", "temperature=0"]
    (tmp_path / "prompts.txt").write_text("The\n")
    run_cli(
        "predict.py",
        f"ckpt_path={ckpt_path}",
        "input=prompts.txt",
        "output=g.jsonl",
        *greedy,
        cwd=tmp_path,
    )
    (row,) = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    ref = run_cli("generate.py", f"ckpt_path={ckpt_path}", "prompt=The", *greedy, cwd=tmp_path)
    assert row["text"] == ref.stdout.rstrip("\n")
    # resuming continues the adapters (the frozen base is not in the checkpoint)
    run_cli(
        "train.py",
        "experiment=finetune_gpt2",
        f"model.init_from={folder}",
        f"data.path={text}",
        *SHORT,
        *LORA,
        f"ckpt_path={ckpt_path}",
        "trainer.max_steps=9",
        cwd=tmp_path,
    )


@pytest.mark.slow  # two training processes
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_lora_on_two_processes(tmp_path, strategy):
    """Frozen base, trainable adapters under DDP and FSDP2 (gloo): the checkpoint holds the
    adapters, trained, and the run tests its best checkpoint on both ranks."""
    folder = write_gpt2(tmp_path / "gpt2")
    text = write_text(tmp_path / "corpus.txt")
    run_cli(
        "train.py",
        "experiment=finetune_gpt2",
        f"model.init_from={folder}",
        f"data.path={text}",
        *SHORT,
        *LORA,
        "trainer=ddp_cpu",
        "trainer.devices=2",
        f"strategy={strategy}",
        cwd=tmp_path,
    )
    (run,) = run_dirs(tmp_path)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(".lora_" in k for k in ckpt["state_dict"]) and len(ckpt["state_dict"]) == 8
    assert "test/loss" in (run / "metrics.json").read_text()
    cfg, _, task = restore(str(run / "checkpoints" / "last.ckpt"))
    assert task.net.blocks[0].attn.qkv.lora_b.abs().max() > 0


@pytest.mark.slow  # an Optuna study of two trials
def test_an_optuna_search_over_lora_runs(tmp_path):
    """hparams_search=gpt_optuna with the net's searched sizes fixed to the checkpoint's: the
    study searches learning rate and weight decay of the adapters."""
    import optuna

    folder = write_gpt2(tmp_path / "gpt2")
    text = write_text(tmp_path / "corpus.txt")
    run_cli(
        "train.py",
        "-m",
        "hparams_search=gpt_optuna",
        "experiment=finetune_gpt2",
        f"model.init_from={folder}",
        f"data.path={text}",
        # a sweep's trials sample no text (gpt_optuna switches the text sample off)
        *[a for a in SHORT if not a.startswith("callbacks.text_sample.")],
        *LORA[:2],
        # gpt_optuna's net sizes, fixed to the pretrained model's (anything else is refused)
        "model.net.n_layer=2",
        "model.net.n_embd=32",
        "model.net.dropout=0.0",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.study_name=lora",
        cwd=tmp_path,
    )
    url = f"sqlite:///{tmp_path / 'logs' / 'train' / 'multiruns' / 'lora' / 'optuna.db'}"
    study = optuna.load_study(study_name="lora", storage=url)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert len({t.params["optimizer.lr"] for t in study.trials}) == 2
    ckpt = next((tmp_path / "logs" / "train" / "multiruns" / "lora").glob("0/checkpoints/*.ckpt"))
    assert all(".lora_" in k for k in torch.load(ckpt, weights_only=True)["state_dict"])
