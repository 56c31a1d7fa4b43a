"""Fine-tuning from pretrained weights: full against LoRA, on CPU, through train.py.

    python bench/finetune.py [--pretrain-steps 400] [--steps 200]

1. "Pre-train" a 4-layer GPT-2 (128 wide, 4 heads, context 128, byte-level BPE of 1024 tokens)
   on CPython's docs (pydoc topics) and write it out as a Hugging Face GPT-2 folder (export_hf).
2. Score that folder on another text, Python source of the standard library (validation split):
   the loss before fine-tuning.
3. Fine-tune it on that text with `experiment=finetune_gpt2`, fully and with LoRA, for the same
   number of steps, and print for each: trainable parameters, peak RSS of the process, steps/s
   (ThroughputMonitor's clock, validation excluded) and the validation loss after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PY, ROOT, logged, ms_per_batch, newest_run  # noqa: E402

NET = ["model.net.n_layer=4", "model.net.n_head=4", "model.net.n_embd=128"]
SHAPE = ["model.net.block_size=128", "data.batch_size=8", "data.max_eval_windows=40"]
LORA = ["model.lora.rank=8", "model.lora.targets=[attn.qkv,attn.proj,mlp.fc,mlp.proj]"]


def write_texts(work: Path) -> tuple[Path, Path]:
    from pydoc_data.topics import topics

    docs = work / "docs.txt"
    docs.write_text("".join(topics.values()), encoding="utf-8")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for folder in ("json", "email", "collections", "asyncio", "concurrent", "importlib"):
        for f in sorted((stdlib / folder).rglob("*.py")):
            parts.append(f.read_text(encoding="utf-8", errors="replace"))
            size += len(parts[-1])
            if size > 400_000:
                break
    code = work / "code.txt"
    code.write_text("\n".join(parts)[:400_000], encoding="utf-8")
    return docs, code


def peak_rss(work: Path, *args: str) -> tuple[Path, int]:
    """One train.py process -> (its run folder, its peak resident memory in bytes, by wait4)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BIGMODEL_ROOT": str(work)}
    with open(work / "out.log", "w") as log:
        proc = subprocess.Popen(
            [PY, str(ROOT / "train.py"), *args], cwd=work, env=env, stdout=log, stderr=log
        )
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = (work / "out.log").read_text()[-3000:]
        raise SystemExit(f"train.py {' '.join(args)} failed:\n{tail}")
    return newest_run(work), usage.ru_maxrss * 1024  # kB on Linux


def loss_before(folder: Path, text: Path, work: Path) -> float:
    """Validation loss of the pretrained folder on the text, on the windows fine-tuning scores."""
    import torch
    import torch.nn.functional as F

    from bigmodel.data import TextDataModule
    from bigmodel.nets import GPT
    from bigmodel.pretrained import hf

    dm = TextDataModule(
        path=str(text),
        tokenizer=str(folder),
        block_size=128,
        batch_size=8,
        max_eval_windows=40,
        cache_dir=str(work / ".cache"),
    )
    dm.setup("fit")
    net = GPT(**hf.net_config(folder))
    hf.load_weights(net, folder)
    net.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            logits = net(x)
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            n += y.numel()
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--work", type=Path, default=None, help="folder for runs (default: a temp one)")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="finetune_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    docs, code = write_texts(work)

    pre_dir = work / "pre"
    pre_dir.mkdir(exist_ok=True)
    run, _ = peak_rss(
        pre_dir,
        f"data.path={docs}",
        "data.tokenizer=bpe",
        "data.vocab_size=1024",
        *NET,
        *SHAPE,
        "model.net.bias=true",
        f"trainer.max_steps={a.pretrain_steps}",
        f"trainer.val_check_interval={a.pretrain_steps}",
        "test=false",
    )
    from bigmodel.checkpoints import restore
    from bigmodel.pretrained.hf import export_hf

    _, datamodule, task = restore(str(run / "checkpoints" / "last.ckpt"))
    folder = work / "gpt2-docs"
    export_hf(task, folder, tokenizer=datamodule.tokenizer)
    before = loss_before(folder, code, work)
    print(
        f"pre-trained {a.pretrain_steps} steps on {docs.name}: val/loss "
        f"{logged(run, 'val/loss')[-1][1]:.3f} on its own text; exported to {folder}"
    )

    common = [
        "experiment=finetune_gpt2",
        f"model.init_from={folder}",
        f"data.path={code}",
        *SHAPE,
        f"trainer.max_steps={a.steps}",
        f"trainer.val_check_interval={a.steps}",
        "scheduler.scheduler.warmup_steps=20",
        "test=false",
    ]
    rows = []
    for name, extra in (
        ("full", ["optimizer.lr=3e-4"]),
        ("LoRA r=8", [*LORA, "optimizer.lr=3e-3"]),
    ):
        d = work / name.split()[0].lower()
        d.mkdir(exist_ok=True)
        run, rss = peak_rss(d, *common, *extra)
        metrics = json.loads((run / "metrics.json").read_text())
        log = (run / "train.log").read_text()
        import torch

        ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        # tensors that share storage (the tied embedding and head) once
        saved = sum(
            v.numel() for v in {v.data_ptr(): v for v in ckpt["state_dict"].values()}.values()
        )
        trainable = sum(
            v.numel()
            for s in ckpt["optimizer_states"][0]["state"].values()
            for k, v in s.items()
            if k == "exp_avg"
        )
        rows.append(
            (
                name,
                trainable,
                saved,
                rss,
                1000 / ms_per_batch(run),
                metrics["val/loss"],
                " ".join(extra),
            )
        )
        assert ("LoRA rank 8" in log) == name.startswith("LoRA")

    print(
        f"\nfine-tuning on {code.name} ({a.steps} steps, batch 8 x 128 tokens, CPU, 1 thread); "
        f"val/loss before: {before:.3f}"
    )
    print("| run | trainable params | params in ckpt | peak RSS | steps/s | val/loss after | |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, tr, saved, rss, sps, loss, extra in rows:
        print(
            f"| {name} | {tr:,} | {saved:,} | {rss / 2**20:.0f} MiB | {sps:.1f} | {loss:.3f} "
            f"| {extra} |"
        )
    print(f"\nwall {time.perf_counter() - t0:.0f} s; runs in {work}")


if __name__ == "__main__":
    main()
