"""The CPU speedrun: `train.py experiment=char_speedrun` against nanoGPT's baby GPT, time to a
validation loss, both scored on every window of the validation split.

    python bench/shakespeare.py && python bench/speedrun.py --data data/shakespeare.txt
    python bench/speedrun.py --ablate     # the recipe with one ingredient taken out at a time
    python bench/speedrun.py --muon-vs-adamw  # the unchanged baby GPT, Muon against AdamW

The reference is `bench/nanogpt_reference.py --whole-val` (nanoGPT's CPU procedure as a plain
PyTorch loop), whose whole-split scoring runs off its clock. Ours is the user's command, a whole
process with every default on, validating once, at its last step, on every window of the split
(that validation is on our clock). The two alternate, `--seeds` times each, so a drift in the
machine's speed hits both alike. Per side: whole-process wall, training time without evaluation,
steps, tokens seen, the final whole-split validation loss, and the wall at which it first reached
`--target` (ours: the whole wall, since it validates at the end only; the reference: the clock of
its first evaluation at or below the target, or none). The ratio divides our median wall to the
target by the reference's, or by its whole wall when it never reaches the target (a bound: the
reference would need longer still). `--json FILE` writes the figures for bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

import yaml
from common import PY, ROOT, logged, newest_run, timed

# one ingredient of the recipe taken out at a time: name -> the overrides that undo it
ABLATIONS: dict[str, list[str]] = {
    "recipe": [],
    "AdamW instead of Muon": [
        "optimizer=adamw",
        "~optimizer.adam_lr",  # the experiment's Muon settings, which AdamW does not take
        "~optimizer.momentum",
        "optimizer.lr=3e-3",
        "optimizer.betas=[0.9,0.95]",
        "optimizer.weight_decay=0",
        "scheduler.scheduler.warmup_steps=30",
    ],
    "GELU instead of ReLU²": ["model.net.mlp=gelu"],
    "no QK-norm": ["model.net.qk_norm=false"],
    "normal init instead of zero": ["model.net.zero_init=false"],
    "tied head": ["model.net.tie_embeddings=true"],
    "learned positions instead of rotary": ["model.net.positions=learned"],
    "LayerNorm instead of RMSNorm": ["model.net.norm=layernorm"],
    "cosine instead of warmup-stable-decay": [
        "scheduler=warmup_cosine",
        "~scheduler.scheduler.decay_fraction",  # warmup-stable-decay's, set by the experiment
        "scheduler.scheduler.warmup_steps=0",
    ],
    "fp32 instead of bf16-mixed": ["precision=32-true"],
}


def ours(data: str, work: Path, seed: int, extra: list[str], experiment: str) -> dict:
    """`train.py experiment=... data.path=FILE seed=S [extra]`, whole process."""
    cmd = [PY, str(ROOT / "train.py"), f"experiment={experiment}", f"data.path={data}"]
    wall, _ = timed([*cmd, f"seed={seed}", *extra], {"BIGMODEL_ROOT": str(work)})
    run = newest_run(work)
    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    steps = int(cfg["trainer"]["max_steps"])
    val = logged(run, "val/loss")[-1][1]
    return {
        "wall_s": round(wall, 2),
        "train_s": round(logged(run, "train/time")[-1][1], 2),
        "steps": steps,
        "tokens": steps * int(cfg["data"]["batch_size"]) * int(cfg["model"]["net"]["block_size"]),
        "val_loss": round(val, 4),
    }


def reference(data: str, seed: int, target: float) -> dict:
    script = str(ROOT / "bench" / "nanogpt_reference.py")
    wall, out = timed([PY, script, f"--data={data}", f"--seed={seed}", "--whole-val"])
    got = json.loads(out.strip().splitlines()[-1])
    got["process_wall_s"] = round(wall, 2)  # its whole-split scoring included
    got["val_loss"] = got.pop("whole_val_loss")
    got["reached_s"] = got["reached"][1] if got["reached"] else None
    return got


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def speedrun(args: argparse.Namespace, data: str, work: Path) -> dict:
    runs: dict[str, list[dict]] = {"ours": [], "ref": []}
    for i, seed in enumerate(range(1337, 1337 + args.seeds)):
        order = ("ref", "ours") if i % 2 == 0 else ("ours", "ref")
        for side in order:
            if side == "ref":
                got = reference(data, seed, args.target)
            else:
                got = ours(data, work, seed, args.overrides, "char_speedrun")
                got["reached_s"] = got["wall_s"] if got["val_loss"] <= args.target else None
            runs[side].append(got)
            print(f"seed {seed} {side}: {json.dumps(got)}", flush=True)
    o, r = runs["ours"], runs["ref"]
    ours_to_target = [g["reached_s"] for g in o]
    ref_reached = [g["reached_s"] for g in r if g["reached_s"] is not None]
    ref_to_target = (
        statistics.median(ref_reached) if len(ref_reached) == len(r) else None
    )  # every seed of the reference reached it
    ref_bound = ref_to_target or statistics.median(g["wall_s"] for g in r)
    result = {
        "target": args.target,
        "seeds": args.seeds,
        "ours": o,
        "ref": r,
        "ours_all_reached": all(t is not None for t in ours_to_target),
        "ours_median_wall_s": round(statistics.median(g["wall_s"] for g in o), 1),
        "ref_median_wall_s": round(statistics.median(g["wall_s"] for g in r), 1),
        "ours_val_loss": spread([g["val_loss"] for g in o]),
        "ref_val_loss": spread([g["val_loss"] for g in r]),
        "ref_reached_seeds": len(ref_reached),
        "ref_median_to_target_s": ref_to_target,
        "overrides": args.overrides,
    }
    if result["ours_all_reached"]:
        result["ratio"] = round(statistics.median(ours_to_target) / ref_bound, 3)
        result["ratio_is_bound"] = ref_to_target is None
    print(json.dumps({k: v for k, v in result.items() if k not in ("ours", "ref")}))
    return result


def ablate(args: argparse.Namespace, data: str, work: Path) -> dict:
    rows = {}
    for name, overrides in ABLATIONS.items():
        if args.only and not any(word in name for word in args.only):
            continue
        got = ours(data, work, 1337, [*overrides, *args.overrides], "char_speedrun")
        rows[name] = got
        print(f"{name}: {json.dumps(got)}", flush=True)
    return {"ablation": rows}


def muon_vs_adamw(args: argparse.Namespace, data: str, work: Path) -> dict:
    """The unchanged baby GPT (experiment=baby_gpt), each optimizer at a few learning rates.
    Muon's step costs more, so it gets fewer steps: as many as fit in AdamW's training time."""
    steps = args.baby_steps
    rows: dict[str, dict] = {}
    for lr in (1e-3, 2e-3, 4e-3, 8e-3):
        got = ours(
            data, work, 1337, [f"trainer.max_steps={steps}", f"optimizer.lr={lr}"], "baby_gpt"
        )
        rows[f"adamw lr={lr}"] = got
        print(f"adamw lr={lr}: {json.dumps(got)}", flush=True)
    adam_train = statistics.median(g["train_s"] for g in rows.values())
    muon_steps = None
    for lr in (0.01, 0.02, 0.04):
        # baby_gpt's AdamW betas are not Muon's; its AdamW part keeps Muon's defaults
        extra = ["optimizer=muon", "~optimizer.betas", f"optimizer.lr={lr}"]
        extra.append("optimizer.weight_decay=0")
        if muon_steps is None:  # its cost per step, from a short run
            # 250 steps: baby_gpt validates every 250
            probe = ours(data, work, 1337, [*extra, "trainer.max_steps=250"], "baby_gpt")
            muon_steps = int(adam_train / (probe["train_s"] / 250))
        # validating at its last step, as AdamW's 1000 do (baby_gpt validates every 250)
        ends = [f"trainer.max_steps={muon_steps}", f"trainer.val_check_interval={muon_steps}"]
        got = ours(data, work, 1337, [*extra, *ends], "baby_gpt")
        rows[f"muon lr={lr}"] = got
        print(f"muon lr={lr}: {json.dumps(got)}", flush=True)
    return {"muon_vs_adamw": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/shakespeare.txt")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--target", type=float, default=1.886)
    ap.add_argument("--ablate", action="store_true", help="one ingredient out at a time")
    ap.add_argument("--muon-vs-adamw", action="store_true", help="on the unchanged baby GPT")
    ap.add_argument("--only", nargs="+", help="--ablate: the rows whose name has one of these")
    ap.add_argument("--baby-steps", type=int, default=1000, help="AdamW's steps there")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("overrides", nargs="*", help="extra train.py overrides for our side")
    args = ap.parse_args()
    if not Path(args.data).exists():
        subprocess.run([PY, str(ROOT / "bench" / "shakespeare.py"), "--out", args.data], check=True)
    data = str(Path(args.data).resolve())
    work = Path(tempfile.mkdtemp(prefix="bench_speedrun_"))
    if args.ablate:
        result = ablate(args, data, work)
    elif args.muon_vs_adamw:
        result = muon_vs_adamw(args, data, work)
    else:
        result = speedrun(args, data, work)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
