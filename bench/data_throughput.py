"""An image folder read the first time and the second (decoded once, then memory-mapped), and
the CNN's training samples/s on 32x32 RGB images.

    python bench/data_throughput.py --images 50000

Writes a folder of `--images` 32x32 RGB JPEGs in 10 classes (DIR/train/<class>/*.jpg; 10 % of
them in DIR/val/), then runs `train.py experiment=digits_cnn data=image_folder data.root=DIR
data.image_size=32` twice for `--steps` steps. For each run it reports the whole-process wall
and the time until the first training step was logged, and training samples/s from
ThroughputMonitor. `--json FILE` writes the figures for bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import PY, ROOT, logged, newest_run, timed
from PIL import Image


def write_folder(root: Path, n: int, seed: int = 0) -> None:
    """Class c: noise with a brighter band at row 3c; a tenth of the files go to val/."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 120, (n, 32, 32, 3), dtype=np.uint8)

    def write(i: int) -> None:
        c, split = i % 10, "val" if i % 10 == (i // 10) % 10 else "train"
        a = noise[i].copy()
        a[3 * c : 3 * c + 3] = 220
        d = root / split / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(d / f"{i}.jpg", quality=90)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(n)))


def run(root: Path, work: Path, steps: int) -> dict:
    cmd = [
        PY,
        str(ROOT / "train.py"),
        "experiment=digits_cnn",
        "data=image_folder",
        f"data.root={root}",
        "data.image_size=32",
        "data.test_fraction=0.0",
        "trainer.max_epochs=null",
        "trainer.check_val_every_n_epoch=null",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.limit_val_batches=5",
        "trainer.log_every_n_steps=10",
        "test=false",
    ]
    wall, _ = timed(cmd, {"BIGMODEL_ROOT": str(work)})
    r = newest_run(work)
    samples = [v for _, v in logged(r, "train/device/samples_per_sec")]
    rate = round(float(np.median(samples[len(samples) // 2 :])), 1) if samples else None
    return {"wall_s": round(wall, 1), "samples_per_s": rate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    root = work / "images"
    write_folder(root, args.images)
    first = run(root, work, args.steps)
    second = run(root, work, args.steps)
    one_step = run(root, work, 1)  # how soon a run on the cached folder is training
    result = {
        "images": args.images,
        "first_run_wall_s": first["wall_s"],
        "cached_run_wall_s": second["wall_s"],
        "cached_one_step_wall_s": one_step["wall_s"],
        "cnn_samples_per_s": second["samples_per_s"],
    }
    for k, v in result.items():
        print(f"{k:>24}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
