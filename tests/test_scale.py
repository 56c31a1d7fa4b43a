"""Scaling on CPU for real: DDP and FSDP2 in 2 processes through the CLI, batch arithmetic,
precision / accumulation / clipping seen at the optimizer step, compile, SIGTERM checkpoints.

Distributed runs go through `train.py` as a subprocess: strategy=ddp re-executes the command line
for rank 1, which a pytest process cannot host.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import pytest
import torch

from bigmodel.distributed import derive_accumulation
from bigmodel.errors import UserError
from bigmodel.run import build_task, build_trainer, set_accumulation
from tests.conftest import TINY_LM, compose_config, logged, run_cli, run_dirs

# Distributed runs keep every default callback: the text sample, drawn on every rank, is what
# once hung FSDP2 when only rank 0 ran its forward passes.
TINY_DDP = TINY_LM


def val_losses(run: Path) -> list[float]:
    return logged(run, "val/loss")


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


# --------------------------------------------------------------------------------- batch sizes
def test_derive_accumulation():
    assert derive_accumulation(64, 8, 2, 2) == 2
    assert derive_accumulation(16, 8, 2, 1) == 1
    with pytest.raises(UserError, match="multiple of 16"):
        derive_accumulation(24, 8, 2, 1)


def test_global_batch_size_that_does_not_divide_is_one_clear_error(tmp_path):
    proc = run_cli("train.py", *TINY_LM, "global_batch_size=12", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "global_batch_size=12 is not a positive multiple of data.batch_size" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------- DDP on CPU
def test_ddp_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """2 ranks x batch 8 == 1 rank x batch 16: same data, same averaged gradient, same losses.

    Both runs use the DDP strategy, so both read the training windows through Lightning's
    distributed sampler (one permutation, split by rank): rank r of 2 gets positions r, r+2, ...
    of the single rank's batch. Tolerance: 1e-4 on validation losses and weights (all-reduce
    sums in another order than a single process).
    """
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    run_cli(
        "train.py", *TINY_DDP, "trainer=ddp_cpu", "trainer.devices=1", "data.batch_size=16", cwd=one
    )
    proc = run_cli(
        "train.py",
        *TINY_DDP,
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "global_batch_size=16",
        cwd=two,
    )
    # the run's opening lines once, from rank 0: rank 1 says only warnings and errors
    out = proc.stdout + proc.stderr
    assert out.count("train: run directory ") == 1 and out.count("  overrides  ") == 1
    assert out.count(" M parameters; run directory ") == 1
    assert out.count("text (embedded corpus): ") == 1
    assert "[rank: 1]" not in out and "GLOBAL_RANK: 1" not in out
    (r1,), (r2,) = run_dirs(one), run_dirs(two)
    l1, l2 = val_losses(r1), val_losses(r2)
    assert len(l1) == len(l2) == 2
    assert l1 == pytest.approx(l2, abs=1e-4)
    w1, w2 = final_weights(r1), final_weights(r2)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-4)
    # global_batch_size=16 with 2 ranks of data.batch_size=8 (the default of TINY_LM) -> no
    # accumulation; the run records what it derived
    cfg = torch.load(r2 / "checkpoints" / "last.ckpt", weights_only=True)["bigmodel"]["config"]
    assert cfg["trainer"]["accumulate_grad_batches"] == 1
    # only rank 0 writes into the run directory: one log, one metrics file, no rank-1 files
    files = sorted(p.relative_to(r2).as_posix() for p in r2.rglob("*") if p.is_file())
    assert "train.log" in files and "metrics.json" in files
    assert not [f for f in files if "rank" in f or "process_1" in f], files
    log = (r2 / "train.log").read_text()
    assert "[rank: 1]" not in log and "train_ddp_process_1" not in log


@pytest.mark.slow  # several training processes: CI runs it after the fast suite
def test_ddp_multirun_gives_one_run_directory_per_job(tmp_path):
    run_cli(
        "train.py",
        "-m",
        *TINY_DDP,
        "trainer=ddp_cpu",
        "trainer.max_steps=6",
        "seed=1,2",
        "test=false",
        cwd=tmp_path,
    )
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == ["0", "1"]
    for job in jobs:
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        assert (sweep / job / "metrics.json").is_file()
    # rank 1 ran inside each job's directory, not in a run directory or a sweep of its own
    assert not (tmp_path / "logs" / "train" / "runs").exists()
    assert len(list((tmp_path / "logs" / "train" / "multiruns").iterdir())) == 1


# ------------------------------------------------------------------------------- FSDP2 on CPU
@pytest.mark.slow  # several training processes: CI runs it after the fast suite
@pytest.mark.parametrize(
    ("model", "strategy"),
    [("gpt", "fsdp2"), ("llama", "fsdp2"), ("llama", "ddp")],
    ids=["gpt-fsdp2", "llama-fsdp2", "llama-ddp"],
)
def test_fsdp2_two_processes_train_checkpoint_and_load_in_one(tmp_path, model, strategy):
    """Also the Llama-style decoder (rotary, GQA, SwiGLU), sharded block by block or replicated."""
    run_cli(
        "train.py",
        f"model={model}",
        *TINY_DDP,
        "trainer=ddp_cpu",
        f"strategy={strategy}",
        *(["model.net.n_kv_head=1"] if model == "llama" else []),
        cwd=tmp_path,
    )
    (run,) = run_dirs(tmp_path)
    losses = val_losses(run)
    assert len(losses) == 2 and losses[1] < losses[0]
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()  # one consolidated file, not a folder of shards
    state = final_weights(run)
    assert all(type(v) is torch.Tensor for v in state.values())  # plain tensors, no DTensors
    proc = run_cli("eval.py", f"ckpt_path={ckpt}", cwd=tmp_path)
    assert "test/loss" in proc.stdout


# ------------------------------------------------- precision, accumulation, clipping at the step
class StepSpy(L.Callback):
    """Records at every optimizer step the batches seen so far, the parameter dtype and the
    gradient norm, and the dtype a Linear layer computes in: what precision, accumulation and
    clipping are supposed to change."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.batches_seen = 0
        self.forward_dtypes: set[torch.dtype] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches_seen += 1
        if not hasattr(self, "_hook"):

            def hook(_, __, output):
                self.forward_dtypes.add(output.dtype)

            self._hook = pl_module.net.blocks[0].attn.qkv.register_forward_hook(hook)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.steps.append(
            {
                "batches": self.batches_seen,
                "param_dtype": next(pl_module.parameters()).dtype,
                "grad_norm_before_clip": float(
                    torch.linalg.vector_norm(
                        torch.stack([torch.linalg.vector_norm(g) for g in grads])
                    )
                ),
            }
        )


def fit_with_spy(tmp_path: Path, *overrides: str) -> tuple[StepSpy, L.LightningModule]:
    tiny = [o for o in TINY_LM if not o.startswith(("scheduler.", "callbacks."))]
    cfg = compose_config(
        "train",
        [
            *tiny,
            "trainer.max_steps=4",
            "trainer.limit_val_batches=0",
            "callbacks=none",
            "logger=[]",
            "scheduler=none",
            *overrides,
        ],
        tmp_path,
    )
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    task = build_task(cfg, dm)
    spy = StepSpy()
    trainer = build_trainer(
        cfg,
        callbacks=[spy],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
    )
    set_accumulation(cfg, trainer)
    clipped: list[float] = []
    original = trainer.precision_plugin.clip_gradients

    def clip_spy(optimizer, clip_val=0.0, gradient_clip_algorithm=None):
        original(optimizer, clip_val, gradient_clip_algorithm)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        clipped.append(float(torch.nn.utils.get_total_norm([p.grad for p in params])))

    trainer.precision_plugin.clip_gradients = clip_spy
    trainer.fit(task, datamodule=dm)
    spy.clipped = clipped
    return spy, task


def test_bf16_mixed_computes_in_bf16_and_keeps_fp32_weights(tmp_path):
    spy32, _ = fit_with_spy(tmp_path / "a", "precision=32-true")
    spy16, _ = fit_with_spy(tmp_path / "b", "precision=bf16-mixed")
    assert spy32.forward_dtypes == {torch.float32}
    assert spy16.forward_dtypes == {torch.bfloat16}
    assert {s["param_dtype"] for s in spy16.steps} == {torch.float32}  # master weights
    spy_true, _ = fit_with_spy(tmp_path / "c", "precision=bf16-true")
    assert {s["param_dtype"] for s in spy_true.steps} == {torch.bfloat16}


def test_accumulation_steps_the_optimizer_every_k_batches(tmp_path):
    spy, _ = fit_with_spy(tmp_path, "trainer.accumulate_grad_batches=3")
    assert [s["batches"] for s in spy.steps] == [3, 6, 9, 12]
    spy, _ = fit_with_spy(tmp_path / "g", "global_batch_size=16")  # 8 per device -> 2 batches
    assert [s["batches"] for s in spy.steps] == [2, 4, 6, 8]


def test_gradient_clipping_bounds_the_norm_at_the_step(tmp_path):
    spy, _ = fit_with_spy(tmp_path, "trainer.gradient_clip_val=0.01")
    assert all(s["grad_norm_before_clip"] > 0.01 for s in spy.steps)
    assert spy.clipped == pytest.approx([0.01] * len(spy.steps), rel=1e-3)
    spy, _ = fit_with_spy(tmp_path / "off", "trainer.gradient_clip_val=null")
    before = [s["grad_norm_before_clip"] for s in spy.steps]
    assert max(before) > 0.01 and spy.clipped in ([], pytest.approx(before, rel=1e-4))


# -------------------------------------------------------------------------------- compile
@pytest.mark.slow
def test_compile_compiles_the_net_and_trains(tmp_path):
    spy, task = fit_with_spy(tmp_path, "model.compile=true", "trainer.max_steps=2")
    assert getattr(task.net, "_compiled", False)
    assert task.net._compiled_call_impl is not None  # nn.Module.compile() installs it
    assert len(spy.steps) == 2


LLAMA_STYLE = dict(norm="rmsnorm", positions="rotary", mlp="swiglu", n_kv_head=1)


@pytest.mark.parametrize("style", [{}, LLAMA_STYLE], ids=["gpt2", "llama"])
def test_activation_checkpointing_gives_the_same_gradients(tmp_path, style):
    from bigmodel.nets import GPT

    torch.manual_seed(0)
    kw = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, **style)
    net = GPT(**kw)
    ckpt_net = GPT(**kw, activation_checkpointing=True)
    ckpt_net.load_state_dict(net.state_dict())
    x = torch.randint(0, 50, (2, 16))
    for m in (net, ckpt_net):
        m(x).square().mean().backward()
    for (name, a), b in zip(net.named_parameters(), ckpt_net.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


# ------------------------------------------------------------------------------------ GPU
GPU_STRATEGIES = [
    "auto",
    "ddp",
    "fsdp",
    "fsdp2",
    "deepspeed_stage_1",
    "deepspeed_stage_2",
    "deepspeed_stage_2_offload",
    "deepspeed_stage_3",
    "deepspeed_stage_3_offload",
]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("strategy", GPU_STRATEGIES)
def test_gpu_strategy_trains_the_gpt(strategy, tmp_path):
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    run_cli(
        "train.py",
        *TINY_DDP,
        "trainer=gpu",
        f"strategy={strategy}",
        "precision=bf16-mixed",
        "test=false",
        cwd=tmp_path,
    )
    (run,) = run_dirs(tmp_path)
    losses = val_losses(run)
    assert len(losses) == 2 and losses[1] < losses[0]
    last = run / "checkpoints" / "last.ckpt"
    if last.is_dir():  # DeepSpeed: a folder of shards -> one file
        from bigmodel.convert import convert

        last = convert(last)
    run_cli("eval.py", f"ckpt_path={last}", cwd=tmp_path)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed", "bf16-true"])
def test_gpu_precision_trains_the_gpt(precision, tmp_path):
    run_cli(
        "train.py",
        *TINY_DDP,
        "trainer=gpu",
        f"precision={precision}",
        "model.compile=true",
        "test=false",
        cwd=tmp_path,
    )
    (run,) = run_dirs(tmp_path)
    losses = val_losses(run)
    assert len(losses) == 2 and losses[1] < losses[0]


def test_fsdp_units_are_the_blocks_of_any_net():
    """strategy=fsdp's policy (bigmodel.distributed.NetBlocks) picks each module of the net's
    `blocks`, whatever its class: checked with torch's activation-checkpointing wrapper, which
    walks the modules with the same policy protocol as FSDP (FSDP1 itself needs CUDA)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        apply_activation_checkpointing,
    )

    from bigmodel.distributed import NetBlocks
    from bigmodel.nets import GPT, ViT
    from bigmodel.tasks import Task

    nets = {
        "llama": GPT(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=16, **LLAMA_STYLE),
        "vit": ViT(num_classes=3, in_channels=1, image_size=8, patch_size=4, n_layer=2, n_embd=8),
    }
    for name, net in nets.items():
        task = Task(net)
        blocks = list(net.blocks)
        apply_activation_checkpointing(task, auto_wrap_policy=NetBlocks())
        wrapped = [m for m in task.modules() if isinstance(m, CheckpointWrapper)]
        assert [w._checkpoint_wrapped_module for w in wrapped] == blocks, name
