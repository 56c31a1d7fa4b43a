"""Start-up, side by side with `python -c "import lightning"` on the same machine.

    python bench/startup.py --rounds 3

Each round times, whole process: `import lightning` alone; a one-step run
(`python train.py trainer.max_steps=1 test=false`: Hydra, the data, the model, one step, a
checkpoint); and `python train.py --help` (Hydra only). It prints the medians and the ratio of
the one-step run to the import. `--json FILE` writes the figures for bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import PY, ROOT, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    env = {"BIGMODEL_ROOT": str(work)}
    commands = {
        "import_lightning_s": [PY, "-c", "import lightning"],
        "one_step_s": [PY, str(ROOT / "train.py"), "trainer.max_steps=1", "test=false"],
        "help_s": [PY, str(ROOT / "train.py"), "--help"],
    }
    timed(commands["one_step_s"], env)  # the embedded corpus' token cache, written once
    times: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(args.rounds):
        for k, cmd in commands.items():
            times[k].append(timed(cmd, env)[0])
    result = {k: round(statistics.median(v), 2) for k, v in times.items()}
    result["one_step_over_import"] = round(result["one_step_s"] / result["import_lightning_s"], 3)
    for k, v in result.items():
        print(f"{k:>22}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
