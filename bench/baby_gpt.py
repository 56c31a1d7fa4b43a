"""`train.py experiment=baby_gpt` against nanoGPT's procedure, whole process, side by side.

    python bench/shakespeare.py && python bench/baby_gpt.py --data data/shakespeare.txt

Runs `bench/nanogpt_reference.py` (nanoGPT's CPU configuration as a plain loop) and
`python train.py experiment=baby_gpt data.path=FILE` (the user's command, every default on)
alternately, `--pairs` times each, and prints the wall time of each whole process, their
median ratio and both validation losses. The machine is noisy: ratios of neighbouring runs
are what count. `--json FILE` writes the figures for bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

from common import PY, ROOT, logged, ms_per_batch, newest_run, timed


def ours(data: str, work: Path, extra: list[str]) -> dict:
    """`train.py experiment=baby_gpt data.path=FILE [extra]`, whole process."""
    cmd = [PY, str(ROOT / "train.py"), "experiment=baby_gpt", f"data.path={data}", *extra]
    wall, _ = timed(cmd, {"BIGMODEL_ROOT": str(work)})
    run = newest_run(work)
    val = logged(run, "val/loss")[-1][1]
    return {"wall_s": wall, "val_loss": val, "ms_per_iter": ms_per_batch(run)}


def reference(data: str) -> dict:
    wall, out = timed([PY, str(ROOT / "bench" / "nanogpt_reference.py"), f"--data={data}"])
    return {**json.loads(out.strip().splitlines()[-1]), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/shakespeare.txt")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("overrides", nargs="*", help="extra train.py overrides (a lever to try)")
    args = ap.parse_args()
    if not Path(args.data).exists():
        subprocess.run([PY, str(ROOT / "bench" / "shakespeare.py"), "--out", args.data], check=True)
    data = str(Path(args.data).resolve())
    work = Path(tempfile.mkdtemp(prefix="bench_baby_gpt_"))
    pairs = []
    for i in range(args.pairs):
        # alternate which goes first, so a drift in the machine's speed hits both alike
        order = ("ref", "ours") if i % 2 == 0 else ("ours", "ref")
        got = {
            k: reference(data) if k == "ref" else ours(data, work, args.overrides) for k in order
        }
        pairs.append(got)
        r, o = got["ref"], got["ours"]
        print(
            f"pair {i + 1}: reference {r['wall_s']:.1f} s (val {r['val_loss']:.3f}, "
            f"{r['ms_per_iter']:.1f} ms/it), train.py {o['wall_s']:.1f} s "
            f"(val {o['val_loss']:.3f}, {o['ms_per_iter']:.1f} ms/it), "
            f"ratio {o['wall_s'] / r['wall_s']:.3f}",
            flush=True,
        )
    ratio = statistics.median(p["ours"]["wall_s"] / p["ref"]["wall_s"] for p in pairs)
    result = {
        "ratio": round(ratio, 3),
        "ours_wall_s": round(statistics.median(p["ours"]["wall_s"] for p in pairs), 1),
        "ref_wall_s": round(statistics.median(p["ref"]["wall_s"] for p in pairs), 1),
        "ours_val_loss": round(statistics.median(p["ours"]["val_loss"] for p in pairs), 4),
        "ref_val_loss": round(statistics.median(p["ref"]["val_loss"] for p in pairs), 4),
        "ours_ms_per_iter": round(statistics.median(p["ours"]["ms_per_iter"] for p in pairs), 1),
        "ref_ms_per_iter": round(statistics.median(p["ref"]["ms_per_iter"] for p in pairs), 1),
        "overrides": args.overrides,
    }
    print(f"median wall ratio train.py / reference: {ratio:.3f}  {json.dumps(result)}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
