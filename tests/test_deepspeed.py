"""DeepSpeed: our strategy configs, their generated DeepSpeed configs, ZeRO on CPU, conversion.

Lightning's DeepSpeedStrategy builds its DeepSpeed config without a GPU but refuses to `fit` on a
CPU. DeepSpeed itself runs every ZeRO stage on CPU over gloo. So the CPU runs here take the config
Lightning generates from `strategy=deepspeed_*` (+ precision, clipping, accumulation) and hand it,
with the task and its optimizer, to `deepspeed.initialize` in 2 processes started by torchrun
(this file is also the worker script: `python -m torch.distributed.run ... test_deepspeed.py`).
The checkpoint it saves has the layout Lightning's strategy writes (model states + client state),
so `python -m bigmodel.convert` and eval.py / generate.py are checked on a real ZeRO-3 folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import TINY_LM, compose_config, run_cli  # noqa: E402

STAGES = {  # config name -> (stage, optimizer offloaded, parameters offloaded)
    "deepspeed_stage_1": (1, False, False),
    "deepspeed_stage_2": (2, False, False),
    "deepspeed_stage_2_offload": (2, True, False),
    "deepspeed_stage_3": (3, False, False),
    "deepspeed_stage_3_offload": (3, True, True),
}
TINY_DS = [o for o in TINY_LM if not o.startswith(("callbacks.", "scheduler."))] + [
    "callbacks=none",
    "logger=[]",
    "data.batch_size=4",
    "scheduler=none",
    # Muon (model=speedrun's optimizer) orthogonalizes whole matrices, which ZeRO shards
    "optimizer=adamw",
]


def generated_config(strategy: str, overrides: list[str], root: Path):
    """Compose `strategy=<name>` + overrides; return (ds_config, task, datamodule, cfg).

    The DeepSpeed config is the one Lightning's DeepSpeedStrategy generates at setup from our
    strategy config and the Trainer's precision / clipping / accumulation.
    """
    import hydra

    from bigmodel.pretrained import prepare, prepare_data
    from bigmodel.run import build_task, build_trainer

    cfg = compose_config("train", [*TINY_DS, f"strategy={strategy}", *overrides], root)
    prepare(cfg)  # as train.py does: model.init_from sizes the net and picks the tokenizer
    dm = hydra.utils.instantiate(cfg.data)
    prepare_data(cfg, dm)
    dm.setup("fit")
    task = build_task(cfg, dm)
    trainer = build_trainer(cfg, accelerator="cpu", devices=1, logger=False)
    strategy_obj = trainer.strategy
    strategy_obj._lightning_module = task
    task.trainer = trainer
    trainer._data_connector.attach_data(task, datamodule=dm)
    strategy_obj._format_config()
    return strategy_obj.config, task, dm, cfg


@pytest.fixture(scope="module")
def deepspeed():
    return pytest.importorskip("deepspeed")


@pytest.mark.parametrize("name", list(STAGES))
@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_generated_config_agrees_with_trainer(deepspeed, name, precision, tmp_path):
    stage, offload_opt, offload_params = STAGES[name]
    ds, _, _, cfg = generated_config(
        name,
        [
            f"precision={precision}",
            "trainer.gradient_clip_val=0.5",
            "trainer.accumulate_grad_batches=3",
        ],
        tmp_path,
    )
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) == offload_opt
    assert ("offload_param" in zero) == offload_params
    if offload_opt:
        assert zero["offload_optimizer"]["device"] == "cpu"
        assert cfg.optimizer._target_ == "deepspeed.ops.adam.DeepSpeedCPUAdam"
    if offload_params:
        assert zero["offload_param"]["device"] == "cpu"
    assert ds.get("bf16", {}).get("enabled", False) == (precision == "bf16-mixed")
    assert "fp16" not in ds
    assert ds["gradient_clipping"] == 0.5
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_micro_batch_size_per_gpu"] == 4  # data.batch_size is per device


def test_global_batch_size_reaches_deepspeed(deepspeed, tmp_path):
    from bigmodel.run import build_trainer, set_accumulation

    cfg = compose_config(
        "train", [*TINY_DS, "strategy=deepspeed_stage_2", "global_batch_size=16"], tmp_path
    )
    trainer = build_trainer(cfg, accelerator="cpu", devices=1, logger=False)
    set_accumulation(cfg, trainer)
    assert trainer.accumulate_grad_batches == 4  # 16 = 4 per device x 1 device x 4 steps


def test_config_file_passes_through_unchanged(deepspeed, tmp_path):
    own = {
        "zero_optimization": {"stage": 3, "stage3_max_live_parameters": 12345},
        "train_micro_batch_size_per_gpu": 4,
        "bf16": {"enabled": True},
        "wall_clock_breakdown": True,
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(own))
    ds, *_ = generated_config(
        "deepspeed",
        [f"strategy.config={path}", "precision=bf16-mixed", "trainer.gradient_clip_val=0"],
        tmp_path,
    )
    for key, value in own.items():
        assert ds[key] == value


# ------------------------------------------------------------------------- ZeRO on 2 CPU ranks
def _torchrun(tmp_path: Path, *args: str, timeout: float = 600) -> dict:
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "BIGMODEL_ROOT": str(tmp_path),
    }
    out = tmp_path / "result.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        str(29500 + os.getpid() % 1000),
        __file__,
        str(tmp_path),
        str(out),
        *args,
    ]
    # plain interpreters: torchrun starts the ranks, each with its own process group
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def _check_trained(results: dict) -> None:
    for name, r in results.items():
        losses = r["losses"]
        assert all(torch.isfinite(torch.tensor(losses))), name
        # the first loss is ~ln(vocab); a few steps at lr 1e-2 must bring it down
        assert min(losses[-3:]) < losses[0] - 0.3, (name, losses)


@pytest.mark.slow  # ~100 s (JIT-builds DeepSpeed's comm op); CI runs it after the fast suite
def test_zero_stages_train_on_cpu(deepspeed, tmp_path):
    """ZeRO 1, 2, 3 from our configs, bf16, over gloo; ZeRO-3 saves a checkpoint that converts."""
    results = _torchrun(tmp_path, "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3")
    _check_trained(results)
    ckpt_dir = Path(results["deepspeed_stage_3"]["checkpoint"])
    assert ckpt_dir.is_dir() and any(ckpt_dir.rglob("*model_states.pt"))

    from bigmodel.convert import convert

    single = convert(ckpt_dir, tmp_path / "consolidated.ckpt")
    ckpt = torch.load(single, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == results["deepspeed_stage_3"]["steps"]
    assert ckpt["bigmodel"]["config"]["strategy"]["stage"] == 3
    assert ckpt["state_dict"]["net.wte.weight"].dtype == torch.float32
    # the consolidated weights are the trained ones the worker saw on rank 0
    trained = torch.load(tmp_path / "full_weights.pt", weights_only=True)
    for k, v in trained.items():
        torch.testing.assert_close(ckpt["state_dict"][k], v.float(), rtol=0, atol=1e-2)
    proc = run_cli("eval.py", f"ckpt_path={single}", cwd=tmp_path)
    assert "test/loss" in proc.stdout
    proc = run_cli(
        "generate.py", f"ckpt_path={single}", "max_new_tokens=10", "prompt=The", cwd=tmp_path
    )
    assert proc.stdout.startswith("The")


@pytest.mark.slow
def test_zero_offload_stages_train_on_cpu(deepspeed, tmp_path):
    """ZeRO-2 and ZeRO-3 with DeepSpeedCPUAdam (JIT-builds cpu_adam once: ~80 s)."""
    _check_trained(_torchrun(tmp_path, "deepspeed_stage_2_offload", "deepspeed_stage_3_offload"))


@pytest.mark.slow
def test_lora_adapters_train_under_zero_2_and_3_on_cpu(deepspeed, tmp_path):
    """LoRA on a pretrained GPT-2 under ZeRO: the adapters train, the frozen base stays put."""
    pytest.importorskip("transformers")
    from tests.test_pretrained import write_gpt2, write_text

    write_gpt2(tmp_path / "gpt2", n_layer=1, n_head=2, n_embd=32, n_positions=32)
    write_text(tmp_path / "corpus.txt")
    results = _torchrun(tmp_path, "deepspeed_stage_2@lora", "deepspeed_stage_3@lora")
    _check_trained(results)
    for name, r in results.items():
        assert r["trainable"] and all(".lora_" in k for k in r["trainable"]), name
        assert r["adapters_moved"] and not r["base_moved"], (name, r)


@pytest.mark.slow
def test_the_llama_decoder_trains_under_zero_2_and_3_on_cpu(deepspeed, tmp_path):
    """model=llama (RMSNorm, rotary, SwiGLU, grouped-query attention) under ZeRO 2 and 3, as the
    GPT trains: every parameter sharded over 2 CPU ranks, the loss falls."""
    results = _torchrun(tmp_path, "deepspeed_stage_2@llama", "deepspeed_stage_3@llama")
    _check_trained(results)
    assert all(r["net"] == ["rotary", "swiglu"] for r in results.values()), results


def _lora(root: Path) -> list[str]:
    """LoRA on the GPT-2 folder the test wrote (its sizes are TINY_DS's)."""
    return [
        f"model.init_from={root / 'gpt2'}",
        f"data.path={root / 'corpus.txt'}",
        "model.lora.rank=4",
        "model.lora.targets=[attn.qkv,mlp.fc]",
    ]


def _worker(root: Path, out: Path, strategies: list[str]) -> None:
    """One rank: train a tiny GPT with deepspeed.initialize for each strategy config
    (`<name>@lora`: LoRA adapters on a pretrained GPT-2 instead; `<name>@llama`: model=llama)."""
    import deepspeed
    import torch.distributed as dist
    import torch.nn.functional as F

    warnings.filterwarnings("ignore")
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name in strategies:
        strategy, _, variant = name.partition("@")
        extra = {"lora": _lora(root), "llama": ["model=llama"]}.get(variant, [])
        ds, task, dm, cfg = generated_config(
            strategy,
            ["precision=bf16-mixed", "optimizer.lr=0.01", "trainer.gradient_clip_val=1.0", *extra],
            root / name,
        )
        trainable = [k for k, p in task.named_parameters() if p.requires_grad]
        before = {k: p.detach().float().clone() for k, p in task.named_parameters()}
        for key in ("offload_optimizer", "offload_param"):  # pinned memory needs CUDA
            ds["zero_optimization"].get(key, {})["pin_memory"] = False
        optimizer = task.configure_optimizers()
        optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
        engine, *_ = deepspeed.initialize(
            model=task, optimizer=optimizer, config=ds, dist_init_required=False
        )
        loader = iter(dm.train_dataloader())
        losses, steps = [], 12
        for i in range(steps * world):
            x, y = next(loader)
            if i % world != rank:  # each rank its own share of the batches
                continue
            logits = engine(x)  # (B, T, V) in bf16
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            engine.backward(loss)
            engine.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(float(mean) / world)
        net = task.net.config
        results[name] = {"losses": losses, "steps": steps, "net": [net.positions, net.mlp]}
        if variant == "lora":
            with deepspeed.zero.GatheredParameters(list(task.parameters())):
                # the engine keeps the module in bf16: a weight left alone is its bf16 rounding
                moved = {
                    k: not torch.equal(p.detach().float(), before[k].to(p.dtype).float())
                    for k, p in task.named_parameters()
                }
            results[name]["trainable"] = trainable
            results[name]["adapters_moved"] = all(moved[k] for k in trainable)
            results[name]["base_moved"] = any(v for k, v in moved.items() if k not in trainable)
        if ds["zero_optimization"]["stage"] == 3 and name == "deepspeed_stage_3":
            # the layout Lightning's DeepSpeedStrategy.save_checkpoint writes: tag "checkpoint",
            # the Lightning/bigmodel records as client state
            ckpt_dir = root / name / "last.ckpt"
            task.run_config = cfg_container(cfg)
            client = {
                "epoch": 0,
                "global_step": steps,
                "pytorch-lightning_version": "2.6",
                "bigmodel": {"config": task.run_config, "task": type(task).__name__},
                "TextDataModule": {"tokenizer": dm.tokenizer.to_dict()},
            }
            engine.save_checkpoint(str(ckpt_dir), client_state=client, tag="checkpoint")
            with deepspeed.zero.GatheredParameters(list(task.parameters())):
                full = {k: v.detach().float().clone() for k, v in task.state_dict().items()}
                if rank == 0:
                    torch.save(full, root / "full_weights.pt")
            results[name]["checkpoint"] = str(ckpt_dir)
        dist.barrier()
    if rank == 0:
        out.write_text(json.dumps(results))
    dist.barrier()


def cfg_container(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
