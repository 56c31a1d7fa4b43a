"""The benchmarks' own correctness: the nanoGPT reference learns, and the README's performance
table is the one bench/run.py renders from bench/results.json."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pydoc_data.topics import topics

from tests import forkserver
from tests.conftest import ROOT


def bench_module(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(
            f"bench_{name}", ROOT / "bench" / f"{name}.py"
        )
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_the_nanogpt_reference_learns_characters(tmp_path):
    text = "\n".join(topics[k] for k in sorted(topics))[:200_000]
    (tmp_path / "t.txt").write_text(text)
    vocab = len(set(text))
    proc = forkserver.run(
        [
            sys.executable,
            str(ROOT / "bench" / "nanogpt_reference.py"),
            f"--data={tmp_path / 't.txt'}",
            "--max-iters=80",
            "--warmup=10",
            "--eval-interval=40",
            "--eval-iters=5",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) == {"wall_s", "ms_per_iter", "val_loss", "threads"}
    assert out["val_loss"] < math.log(vocab) - 1.0, out  # from uniform over the characters


def test_the_readme_performance_table_is_rendered_from_results_json():
    run = bench_module("run")
    results = json.loads(run.RESULTS.read_text())
    assert set(results["machine"]) >= {"cpu", "cores", "torch", "date"}
    readme = (ROOT / "README.md").read_text()
    assert run.START in readme and run.END in readme
    shown = readme.split(run.START, 1)[1].split(run.END, 1)[0].strip()
    assert shown == run.table(results)  # rerun `python bench/run.py --table` after a benchmark
    # every benchmark the runner knows has its figures in the file, and a row in the table
    assert set(run.BENCHMARKS) <= set(results)
    assert len(run.rows(results)) >= len(run.BENCHMARKS)
