"""The benchmarks' own correctness: the nanoGPT reference learns, and the README's performance
table is the one bench/run.py renders from bench/results.json."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pydoc_data.topics import topics

import pytest

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
    # bench/speedrun.py's reading: every val window scored off the clock, and when it first got
    # to the target
    proc = forkserver.run(
        [*proc.args, "--whole-val", "--target=3.0"],
        capture_output=True,
        text=True,
        check=True,
        env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    evals = out["evals"]  # [iteration, clock s, 20-batch estimate, whole split]
    assert [e[0] for e in evals] == [0, 40, 80] and out["steps"] == 81
    # the whole split and the 20-batch estimate agree, on the untrained model and after
    assert abs(evals[0][3] - evals[0][2]) < 0.1 and evals[-1][3] < evals[0][3] - 1.0
    assert abs(evals[-1][3] - evals[-1][2]) < 0.3 and out["whole_val_loss"] == evals[-1][3]
    assert evals[0][1] < evals[1][1] < evals[2][1] <= out["wall_s"] and out["off_clock_s"] > 0
    first = next(e for e in evals if e[3] <= 3.0)
    assert out["reached"] == [first[0], first[1]], out


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


def test_serving_rows_name_the_model_size_when_they_have_it():
    run = bench_module("run")
    row = {"engine": "torch", "batching": "on", "concurrency": 1, "p50_ms": 1, "p99_ms": 2}
    rendered = run.rows(
        {
            "serving": [
                {**row, "model": "llama", "params_m": 25.4, "req_s": 3},
                {**row, "model": "gpt", "req_s": 5},
            ]
        }
    )
    assert [what for what, _, _ in rendered] == [
        "serve.py: llama (25.4 M), torch, batching on",
        "serve.py: gpt, torch, batching on",  # a row of before: as it was
    ]


@pytest.mark.slow  # a Llama trained one step and two servers: about a minute
def test_serving_benchmark_takes_a_llama(tmp_path):
    """bench/serve.py --llama: a Llama-style checkpoint gets the GPT's requests, on PyTorch
    only by default (--llama-engines), batching on and off; its rows carry the net's size."""
    import subprocess

    from tests.conftest import run_cli, run_dirs

    run_cli(
        "train.py", "model=llama", "model.net.n_layer=2", "model.net.n_embd=64",
        "trainer.max_steps=1", "test=false", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    (run_dir,) = run_dirs(tmp_path)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    # a plain interpreter: the benchmark starts and stops servers of its own
    proc = subprocess.run(
        [
            sys.executable, str(ROOT / "bench" / "serve.py"), f"--llama={ckpt}",
            "--engines", "torch", "onnx", "--concurrency", "1", "4", "--requests=4",
            "--seconds=10", "--warmup=1", f"--json={tmp_path / 'rows.json'}",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["model"], r["engine"], r["batching"], r["concurrency"]) for r in rows] == [
        ("llama", "torch", b, c) for b in ("on", "off") for c in (1, 4)
    ]
    assert all(r["n"] == 4 and 0 < r["p50_ms"] <= r["p99_ms"] and r["req_s"] > 0 for r in rows)
    size = rows[0]["params_m"]
    assert 0.1 < size < 1 and f"| llama ({size} M) | torch | on | 1 |" in proc.stdout


def test_the_generation_benchmark_reports_the_floor_of_a_decode_step(tmp_path):
    """bench/generation.py --quick: the same greedy tokens as transformers, and the floor of a
    decode step computed over exactly the net's Linear weights (the tied head once)."""
    import torch

    generation = bench_module("generation")
    with torch.no_grad():
        out = generation.measure("tiny", 1, 8, 8, repeats=1)
    assert out["same_tokens"] is True and out["dtype"] == "float32"
    net, _ = generation.build("tiny", tmp_path)
    # the weight matmuls: 4 per block (qkv, proj, fc, proj) and the head, fp32
    shapes = [tuple(m.weight.shape) for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(shapes) == 4 * 2 + 1
    nbytes = 4 * sum(a * b for a, b in shapes)

    def within(value: float, num: tuple[float, float], den: tuple[float, float]) -> bool:
        """value is num / den, up to the rounding of the printed figures (ms to 0.01, 0.001)."""
        return num[0] / den[1] - 0.1 <= value <= num[1] / den[0] + 0.1

    floor = (out["floor_decode_ms"] - 0.0005, out["floor_decode_ms"] + 0.0005)
    assert floor[0] > 0
    assert within(out["floor_weights_gb_per_s"], (nbytes / 1e6, nbytes / 1e6), floor)
    for side in ("ours", "theirs"):
        decode = out[f"{side}_decode_ms_per_step"]
        assert within(out[f"{side}_decode_over_floor"], (decode - 0.005, decode + 0.005), floor)
