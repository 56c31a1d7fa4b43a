"""What checkpointing costs the default run: bigmodel's cadence and atomic writes against
Lightning's plain `save_last`, side by side in one run (alternating, so machine noise hits both).

    python bench/checkpointing.py                       # default run, 300 steps, 3 rounds
    python bench/checkpointing.py --steps 1500 --rounds 1

Each variant is `python train.py` (the default GPT on the embedded corpus) with:
- lightning: last.ckpt at validations only (ModelCheckpoint save_last), Lightning's writer;
- default:   callbacks.last_checkpoint (every 100 steps and 30 minutes, after validations, at
             the end), written atomically (temporary file, fsync, rename);
- every_10:  the same, every 10 steps: what a tight cadence costs.
It prints the training time (the run's `time/total_s`) of each and the ratio to `lightning`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "lightning": [
        "callbacks.last_checkpoint=null",
        "callbacks.model_checkpoint.save_last=true",
        "+trainer.plugins=[{_target_:lightning.pytorch.plugins.io.TorchCheckpointIO}]",
    ],
    "default": [],
    "every_10": ["callbacks.last_checkpoint.every_n_train_steps=10"],
}


def run(variant: str, steps: int, root: Path) -> float:
    out = root / variant
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            f"trainer.max_steps={steps}",
            "test=false",
            f"hydra.run.dir={out}",
            "resume=never",
            *VARIANTS[variant],
        ],
        cwd=root,
        env={**os.environ, "BIGMODEL_ROOT": str(root)},
        check=True,
        capture_output=True,
    )
    seconds = json.loads((out / "metrics.json").read_text())["time/total_s"]
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for v in VARIANTS:
                times[v].append(run(v, args.steps, Path(tmp)))
                print(f"round {r + 1} {v:10s} {times[v][-1]:7.2f} s", flush=True)
    base = statistics.median(times["lightning"])
    print(f"\n{args.steps} steps, median of {args.rounds}:")
    for v, ts in times.items():
        m = statistics.median(ts)
        print(f"  {v:10s} {m:7.2f} s   x{m / base:.3f} of lightning")


if __name__ == "__main__":
    main()
