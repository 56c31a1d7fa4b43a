"""GPU throughput of a GPT through the project's own task and Lightning Trainer.

    python bench/gpu_throughput.py --model gpt2_124m --batch 32 --steps 60
    python bench/gpu_throughput.py --max-width --strategy ddp            (largest n_embd that fits)

Prints tokens/s, model FLOPs utilisation (MFU, as nanoGPT and litgpt compute it: the net's
training FLOPs per token (6 N + 12 L C T) x tokens/s over the device's peak bf16 dense FLOPs,
which Lightning knows per chip) and peak memory. Random tokens: the data pipeline is not measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

import bigmodel.console  # noqa: F401  (Lightning's lines once, no tips)
from bigmodel.nets import GPT
from bigmodel.tasks import LanguageModel

SIZES = {"gpt2_124m": dict(n_layer=12, n_head=12, n_embd=768)}


class RandomTokens(Dataset):
    def __init__(self, n: int, block: int, vocab: int) -> None:
        self.n, self.block, self.vocab = n, block, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        x = torch.randint(0, self.vocab, (self.block + 1,), generator=g)
        return x[:-1], x[1:]


class Timer(L.Callback):
    """Wall time of the optimizer steps after `warmup` (compilation, allocator warm-up)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.steps = warmup, None, 0

    def on_train_batch_end(self, trainer, *_):
        if trainer.global_step == self.warmup:
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()
        elif self.t0 is not None:
            self.steps += 1

    def on_train_end(self, trainer, *_):
        torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0


def run(args) -> dict:
    from functools import partial

    from lightning.fabric.utilities.throughput import get_available_flops

    torch.backends.cuda.matmul.allow_tf32 = True
    size = SIZES.get(args.model, {}) | (
        {"n_embd": args.width, "n_head": args.width // 64, "n_layer": args.layers}
        if args.width
        else {}
    )
    net = GPT(vocab_size=50304, block_size=args.block, bias=False, **size)
    opt = partial(torch.optim.AdamW, lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    task = LanguageModel(net, optimizer=opt, compile=args.compile)
    strategy = args.strategy
    if strategy.startswith("deepspeed"):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        offload = "offload" in strategy
        strategy = DeepSpeedStrategy(stage=3, offload_optimizer=offload, offload_parameters=offload)
        if offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            task.optimizer_factory = partial(DeepSpeedCPUAdam, lr=6e-4, weight_decay=0.1)
    timer = Timer(args.warmup)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        strategy=strategy,
        precision="bf16-mixed",
        max_steps=args.warmup + args.steps,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    data = DataLoader(
        RandomTokens(args.batch * (args.warmup + args.steps + 2), args.block, 50304),
        batch_size=args.batch,
        num_workers=4,
        pin_memory=True,
        drop_last=True,
    )
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(task, train_dataloaders=data)
    tokens_per_s = timer.steps * args.batch * args.block / timer.seconds
    flops_per_token = net.flops_per_token(args.block)
    peak = get_available_flops(torch.device("cuda"), torch.bfloat16) or 989e12
    return {
        "model": args.model,
        "width": net.config.n_embd,
        "layers": net.config.n_layer,
        "params_M": net.num_params() / 1e6,
        "batch": args.batch,
        "block": args.block,
        "strategy": args.strategy,
        "compile": args.compile,
        "tokens_per_s": tokens_per_s,
        "mfu": flops_per_token * tokens_per_s / peak,
        "peak_flops": peak,
        "peak_mem_GB": torch.cuda.max_memory_allocated() / 1e9,
        "gpu": torch.cuda.get_device_name(),
    }


def max_width(args) -> dict:
    """Largest n_embd (24 layers, head size 64) whose training step fits, one subprocess each."""
    fits = None
    for width in (1024, 2048, 3072, 4096, 5120, 6144, 8192):
        cmd = [
            sys.executable,
            __file__,
            "--width",
            str(width),
            "--layers",
            "24",
            "--batch",
            "8",
            "--block",
            "1024",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--strategy",
            args.strategy,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.trial_timeout)
        except subprocess.TimeoutExpired:
            print(f"width {width}: over {args.trial_timeout} s, stopping", flush=True)
            break
        if proc.returncode != 0:
            oom = "out of memory" in (proc.stderr + proc.stdout).lower()
            print(f"width {width}: {'out of memory' if oom else 'failed'}", flush=True)
            if not oom:
                print(proc.stderr[-2000:])
            break
        fits = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"width {width}: fits ({fits['params_M']:.0f} M params, "
            f"{fits['peak_mem_GB']:.1f} GB peak)",
            flush=True,
        )
    return {"strategy": args.strategy, "largest": fits}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="gpt2_124m")
    p.add_argument("--width", type=int, default=0, help="n_embd (overrides --model)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument(
        "--strategy", default="auto", help="auto, ddp, deepspeed_stage_3, deepspeed_stage_3_offload"
    )
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--max-width", action="store_true")
    p.add_argument("--trial-timeout", type=float, default=150)
    args = p.parse_args()
    result = max_width(args) if args.max_width else run(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
