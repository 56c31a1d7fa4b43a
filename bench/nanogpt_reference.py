"""nanoGPT's CPU "baby GPT" procedure, written out as a plain PyTorch loop: the reference.

    python bench/nanogpt_reference.py --data data/shakespeare.txt

nanoGPT is not part of this tree. This follows its published procedure for the character-level
Shakespeare model on a CPU (its README: `--device=cpu --compile=False --eval_iters=20
--log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
--max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`) with its model and training loop:
- the text as uint16 character ids, 90 % train and 10 % val, read through np.memmap;
- random windows of 64 characters, batch 12;
- GPT-2 blocks (pre-LayerNorm without biases, causal SDPA attention, 4x GELU MLP), tied
  embedding and head, N(0, 0.02) init with residual projections scaled by 1/sqrt(2 n_layer);
- AdamW (foreach, as nanoGPT gets on a CPU) lr 1e-3, betas (0.9, 0.99), weight decay 0.1 on
  the matrices only, 100 warmup iterations then cosine decay to 1e-4 at iteration 2000;
- gradient clipping at 1; the loss read every iteration (log_interval=1);
- at every 250th iteration (0 included) the mean loss of 20 random batches of each split, and
  a checkpoint of model and optimizer whenever the val loss improves (after iteration 0).
It prints one JSON line: wall time, ms per iteration and the last val loss.

`--whole-val` also scores every window of the validation split at each evaluation (64 tokens,
non-overlapping, as train.py's validation does) off the clock: its time is subtracted from the
wall reported, and the iteration and clock at which that loss first reached `--target` are
reported (bench/speedrun.py).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class SelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.attn = SelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, block: int, n_layer: int, n_head: int, n_embd: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T))  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/shakespeare.txt")
    ap.add_argument("--max-iters", type=int, default=2000)
    ap.add_argument("--eval-interval", type=int, default=250)
    ap.add_argument("--eval-iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=100, help="warm-up iterations (shorter tests)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--whole-val", action="store_true", help="also score the whole val split")
    ap.add_argument("--target", type=float, default=1.886, help="the whole-split loss to reach")
    args = ap.parse_args()
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    block, batch, warmup, lr, min_lr = 64, 12, args.warmup, 1e-3, 1e-4

    # prepare.py: characters -> uint16 ids, 90 / 10, written once and memory-mapped
    text = Path(args.data).read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    work = Path(tempfile.mkdtemp(prefix="nanogpt_ref_"))
    n = int(0.9 * len(ids))
    ids[:n].tofile(work / "train.bin")
    ids[n:].tofile(work / "val.bin")

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = np.memmap(work / f"{split}.bin", dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - block, (batch,))
        x = torch.stack([torch.from_numpy(data[i : i + block].astype(np.int64)) for i in ix])
        y = torch.stack(
            [torch.from_numpy(data[i + 1 : i + 1 + block].astype(np.int64)) for i in ix]
        )
        return x, y

    model = GPT(len(chars), block, n_layer=4, n_head=4, n_embd=128)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))

    def get_lr(it: int) -> float:
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if it > args.max_iters:
            return min_lr
        ratio = (it - warmup) / (args.max_iters - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        model.eval()
        out = {}
        for split in ("train", "val"):
            losses = torch.zeros(args.eval_iters)
            for k in range(args.eval_iters):
                losses[k] = model(*get_batch(split)).item()
            out[split] = losses.mean().item()
        model.train()
        return out

    @torch.no_grad()
    def whole_val() -> float:
        """Mean loss over every non-overlapping 64-token window of the val split."""
        data = torch.from_numpy(np.fromfile(work / "val.bin", dtype=np.uint16).astype(np.int64))
        n_win = (len(data) - 1) // block
        xs = data[: n_win * block].view(n_win, block)
        ys = data[1 : n_win * block + 1].view(n_win, block)
        model.eval()
        total = sum(
            model(xs[i : i + 256], ys[i : i + 256]).item() * len(xs[i : i + 256])
            for i in range(0, n_win, 256)
        )
        model.train()
        return total / n_win

    best_val, val_loss, step_times = 1e9, float("nan"), []
    off_clock, evals, reached = 0.0, [], None
    x, y = get_batch("train")
    for it in range(args.max_iters + 1):
        for g in opt.param_groups:
            g["lr"] = get_lr(it)
        if it % args.eval_interval == 0:
            val_loss = estimate_loss()["val"]
            if args.whole_val:
                t_off = time.perf_counter()
                whole = whole_val()
                off_clock += time.perf_counter() - t_off
                clock = time.perf_counter() - t_start - off_clock
                evals.append([it, round(clock, 2), round(val_loss, 4), round(whole, 4)])
                if reached is None and whole <= args.target:
                    reached = [it, round(clock, 2)]
            if val_loss < best_val and it > 0:
                best_val = val_loss
                ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "iter": it}
                torch.save(ckpt, work / "ckpt.pt")
        t = time.perf_counter()
        loss = model(x, y)
        x, y = get_batch("train")  # the next batch, as nanoGPT prefetches it
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # log_interval=1
        step_times.append(time.perf_counter() - t)
    skip = len(step_times) // 10
    out = {
        "wall_s": round(time.perf_counter() - t_start - off_clock, 2),
        "ms_per_iter": round(1000 * float(np.mean(step_times[skip:])), 2),
        "val_loss": round(val_loss, 4),
        "threads": torch.get_num_threads(),
    }
    if args.whole_val:
        out.update(
            train_s=round(sum(step_times), 2),
            steps=args.max_iters + 1,  # nanoGPT's loop runs iterations 0..max_iters
            tokens=(args.max_iters + 1) * batch * block,
            whole_val_loss=evals[-1][3],
            reached=reached,
            evals=evals,
            off_clock_s=round(off_clock, 2),
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
