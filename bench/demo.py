"""The embedded default, `python train.py`, as a newcomer runs it, beside the default it replaced.

    python bench/demo.py

Runs, whole process, one after the other: `python train.py` (model=speedrun: rotary, RMSNorm,
ReLU², QK-norm, an untied zero-init head, Muon and warmup-stable-decay, batch 32, 250 steps) and
the previous default (`model=gpt` with AdamW and warmup-cosine, batch 12, 1000 steps). Prints,
for each, the wall time, the validation perplexity at the first and the last validation and
their ratio, tokens/s, and the last text sample. `--json FILE` writes the figures for
bench/run.py; extra arguments are overrides of the new default's run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import PY, ROOT, logged, newest_run, timed

# the default of train.py before model=speedrun
BEFORE = [
    "model=gpt",
    "optimizer=adamw",
    "scheduler=warmup_cosine",
    "data.batch_size=12",
    "trainer.max_steps=1000",
]


def run(overrides: list[str]) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_demo_"))
    wall, out = timed([PY, str(ROOT / "train.py"), *overrides], {"BIGMODEL_ROOT": str(work)})
    folder = newest_run(work)
    ppl = logged(folder, "val/ppl")
    tokens = logged(folder, "train/device/items_per_sec")
    sample = out.rsplit("--- sample at step", 1)[-1].split("\n", 1)[-1].split("---")[0].strip()
    return {
        "wall_s": round(wall, 1),
        "first_val_ppl": round(ppl[0][1], 2),
        "first_val_step": ppl[0][0],
        "last_val_ppl": round(ppl[-1][1], 2),
        "last_val_step": ppl[-1][0],
        "ppl_ratio": round(ppl[0][1] / ppl[-1][1], 2),
        "tokens_per_s": round(
            sum(v for _, v in tokens[len(tokens) // 2 :]) / max(1, len(tokens) - len(tokens) // 2)
        ),
        "sample": sample[:300],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("overrides", nargs="*", help="extra train.py overrides")
    args = ap.parse_args()
    result = run(args.overrides)
    result["before"] = run(BEFORE)
    for name, figures in (
        ("python train.py", result),
        ("before: " + " ".join(BEFORE), result["before"]),
    ):
        print(f"== {name}")
        for k, v in figures.items():
            if k != "before":
                print(f"{k:>15}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
