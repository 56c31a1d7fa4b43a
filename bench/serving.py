"""bench/serve.py on two models this script trains first: the digits CNN and the char GPT.

    python bench/serving.py --seconds 5

Trains `experiment=digits_cnn` and the default char GPT briefly, then runs bench/serve.py
(a real HTTP client against serve.py on loopback) on both, batching on and off, PyTorch and
ONNX Runtime, at concurrency 1, 8 and 32. `--json FILE` writes its rows for bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import PY, ROOT, newest_run, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5, help="at most, per setting")
    ap.add_argument("--requests", type=int, default=200, help="at most, per setting")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    env = {"BIGMODEL_ROOT": str(work)}
    timed([PY, str(ROOT / "train.py"), "experiment=digits_cnn", "trainer.max_epochs=3"], env)
    digits = newest_run(work) / "checkpoints" / "last.ckpt"
    timed([PY, str(ROOT / "train.py"), "trainer.max_steps=300", "test=false"], env)
    gpt = newest_run(work) / "checkpoints" / "last.ckpt"
    out = work / "rows.json"
    cmd = [PY, str(ROOT / "bench" / "serve.py"), f"--digits={digits}", f"--gpt={gpt}"]
    cmd += [f"--seconds={args.seconds}", f"--requests={args.requests}", f"--json={out}"]
    _, printed = timed(cmd)
    print(printed)
    if args.json:
        Path(args.json).write_text(json.dumps(json.loads(out.read_text()), indent=1))


if __name__ == "__main__":
    main()
