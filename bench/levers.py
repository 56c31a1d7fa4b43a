"""Each speed lever of the baby GPT measured against the same run without it.

    python bench/shakespeare.py && python bench/levers.py --data data/shakespeare.txt

Every lever is a `train.py` override on `experiment=baby_gpt` (shortened to `--steps`). Runs
alternate baseline, lever, baseline, lever, ... so both see the same machine; the table gives
ms per iteration (ThroughputMonitor's clock, training batches only), whole-process wall and
the last validation loss of each, and the ratio to the neighbouring baseline.
`torch.compile` runs once to fill its cache and is measured on the second run (a warm cache).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from baby_gpt import ours  # bench/ is on sys.path when this file runs

from bigmodel.hardware import fast_bf16

# name: (overrides of the baseline, overrides of the lever); experiment=baby_gpt runs in
# precision=auto (bf16-mixed on a CPU with bf16 instructions, where AdamW keeps the foreach
# kernels, else fp32), so the precision and AdamW kernel levers name theirs
FP32 = ["precision=32-true"]
BF16 = "bf16-mixed instead of fp32"
LEVERS: dict[str, tuple[list[str], list[str]]] = {
    BF16: (FP32, ["precision=bf16-mixed"]),
    "torch.compile (warm cache)": ([], ["model.compile=true"]),
    "every validation window": ([], ["data.max_eval_windows=null"]),
    # in fp32 the default is fused AdamW on one device (bigmodel.tasks.base)
    "foreach AdamW instead of fused (fp32)": (FP32, [*FP32, "+optimizer.foreach=true"]),
    "for-loop AdamW instead of fused (fp32)": (FP32, [*FP32, "+optimizer.foreach=false"]),
    "no loss guard (a host sync a step)": ([], ["callbacks.loss_guard=null"]),
    # without its callback Lightning would add its own bar: both off
    "no progress bar": (
        [],
        ["callbacks.rich_progress_bar=null", "+trainer.enable_progress_bar=false"],
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/shakespeare.txt")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--only", nargs="*", help="lever names to run (default: all)")
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args()
    data = str(Path(args.data).resolve())
    work = Path(tempfile.mkdtemp(prefix="bench_levers_"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
    short = [f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps // 2}"]
    rows = []
    for name, (baseline, extra) in LEVERS.items():
        if args.only and name not in args.only:
            continue
        note, steps = "", short
        fast, why = fast_bf16("cpu")
        if name == BF16 and not fast:
            # emulated bf16 matmuls are ~50x slower than fp32: a few steps tell the ratio
            note = f"{why}: bf16 is emulated"
            steps = ["trainer.max_steps=20", "trainer.val_check_interval=10"]
        base = ours(data, work, [*steps, *baseline])
        if "model.compile=true" in extra:
            ours(data, work, [*steps, *extra])  # fills the compile cache
        lever = ours(data, work, [*steps, *extra])
        row = {"lever": name, "overrides": extra, "baseline": base, "with": lever}
        if note:
            row["note"] = f"{note}; {steps[0]}"
        row["baseline_overrides"] = baseline
        row["ms_ratio"] = round(lever["ms_per_iter"] / base["ms_per_iter"], 3)
        row["wall_ratio"] = round(lever["wall_s"] / base["wall_s"], 3)
        rows.append(row)
        print(
            f"{name:<36} ms/it {base['ms_per_iter']:6.1f} -> {lever['ms_per_iter']:6.1f} "
            f"({row['ms_ratio']:.3f}x)  wall {base['wall_s']:6.1f} -> {lever['wall_s']:6.1f} s "
            f"({row['wall_ratio']:.3f}x)  val {base['val_loss']:.4f} -> {lever['val_loss']:.4f}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
