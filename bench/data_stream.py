"""Token shards, measured: preparation throughput, training memory under a limit, and training
speed from shards against the in-memory text path.

    python bench/data_stream.py --gb 2.5 --limit-gb 1.5 --steps 2000      # the figures of record
    python bench/data_stream.py --gb 0.01 --steps 30 --limit-gb 0         # does it all run?

1. Generates `--gb` of English-like text (words of CPython's docs in a seeded random order) into
   64 MB files, never holding more than one file's text.
2. `python -m bigmodel.prepare_data` on it with 1 and then 2 workers: MB/s and tokens/s (char
   tokenizer; the 2-worker shards are the ones trained from).
3. `train.py data=text_stream` for `--steps` steps under an address-space limit of `--limit-gb`
   (RLIMIT_AS, as `ulimit -v` sets; 0: none), the process's RSS sampled every 0.2 s against the
   step it had logged: peak RSS from step 100 (or a tenth of the run) to the end, and the table.
4. The same model on `data=text` from `--mem-mb` of the same text held in memory, and from
   shards of that same text: training tokens/s from ThroughputMonitor's clock, side by side.

`--json FILE` writes the figures. Compare figures only from one machine, taken side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import PY, ROOT, logged, ms_per_batch, newest_run, timed

MODEL = [
    "model.net.n_layer=2",
    "model.net.n_head=4",
    "model.net.n_embd=128",
    "model.net.block_size=128",
    "data.batch_size=16",
]


def generate(folder: Path, gb: float, seed: int = 0) -> int:
    """`gb` of text in 64 MB files of seeded word salad; returns the bytes written."""
    from pydoc_data.topics import topics

    words = re.findall(r"\S+", " ".join(topics.values()))
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    total, target, file_bytes, i = 0, int(gb * 1e9), 64 * 2**20, 0
    while total < target:
        size = min(file_bytes, target - total)
        lines, n = [], 0
        while n < size:
            line = " ".join(rng.choices(words, k=12)) + "\n"
            lines.append(line)
            n += len(line.encode())
        data = "".join(lines).encode()[:size]
        data = data[: data.rfind(b"\n") + 1] or data
        (folder / f"part{i:04d}.txt").write_bytes(data)
        total += len(data)
        i += 1
    return total


def prepare(src: Path, out: Path, workers: int, work: Path) -> dict:
    cmd = [PY, "-m", "bigmodel.prepare_data", f"source={src}", f"out={out}", f"workers={workers}"]
    wall, _ = timed(cmd, {"BIGMODEL_ROOT": str(work)}, cwd=work)
    m = json.loads((out / "manifest.json").read_text())
    mb = m["source_bytes"] / 1e6
    return {
        "workers": workers,
        "wall_s": round(wall, 1),
        "MB_per_s": round(mb / wall, 2),
        "tokens_per_s": round(m["tokens"] / wall),
    }


def rss_of(pid: int) -> int:
    """Resident bytes of a process and its children (loader workers)."""
    total = 0
    pids = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(k) for k in kids]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def last_step(run_root: Path) -> int:
    try:
        run = newest_run(run_root)
        return max((s for s, _ in logged(run, "train/loss")), default=-1)
    except (OSError, ValueError):
        return -1


def train_under_limit(shards: Path, work: Path, steps: int, limit_gb: float) -> dict:
    cmd = [
        PY,
        str(ROOT / "train.py"),
        "data=text_stream",
        f"data.path={shards}",
        *MODEL,
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.limit_val_batches=5",
        "trainer.log_every_n_steps=1",
        "+logger.csv.flush_logs_every_n_steps=1",
        "test=false",
    ]

    def limit() -> None:
        if limit_gb > 0:
            n = int(limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (n, n))

    env = {**os.environ, "BIGMODEL_ROOT": str(work), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=work, env=env, preexec_fn=limit, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    samples: list[tuple[int, int]] = []  # (step, rss)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set() and proc.poll() is None:
            samples.append((last_step(work), rss_of(proc.pid)))
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    stop.set()
    t.join()
    if proc.returncode:
        raise SystemExit(f"training under {limit_gb} GB failed:\n{err.decode()[-3000:]}")
    from_step = min(100, steps // 10)
    later = [r for s, r in samples if s >= from_step]
    at = [r for s, r in samples if s >= from_step][:1] or [0]
    table = []
    for mark in sorted({from_step, *range(0, steps + 1, max(1, steps // 10))}):
        rs = [r for s, r in samples if s >= mark]
        if rs:
            table.append((mark, round(rs[0] / 2**20)))
    return {
        "limit_gb": limit_gb,
        "rss_mb_by_step": table,
        "rss_mb_at_start_of_window": round(at[0] / 2**20),
        "peak_rss_mb_after_step": round(max(later, default=0) / 2**20),
        "window_from_step": from_step,
    }


def tokens_per_s(args: list[str], work: Path, steps: int) -> float:
    cmd = [
        PY,
        str(ROOT / "train.py"),
        *args,
        *MODEL,
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "test=false",
    ]
    timed(cmd, {"BIGMODEL_ROOT": str(work), "OMP_NUM_THREADS": "1"}, cwd=work)
    return round(16 * 128 / (ms_per_batch(newest_run(work)) / 1000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.5, help="corpus size")
    ap.add_argument("--limit-gb", type=float, default=1.5, help="RLIMIT_AS for training; 0: none")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--mem-mb", type=float, default=50, help="text for the in-memory comparison")
    ap.add_argument("--work", help="a folder to work in (default: a new temporary one)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_stream_"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus"
    written = generate(corpus, args.gb)
    print(f"corpus: {written / 1e9:.2f} GB in {len(list(corpus.iterdir()))} files at {corpus}")
    prep = [prepare(corpus, work / f"shards_{w}", w, work) for w in (1, 2)]
    for p in prep:
        print(
            f"prepare_data workers={p['workers']}: {p['MB_per_s']} MB/s, "
            f"{p['tokens_per_s']:,} tokens/s ({p['wall_s']} s)"
        )
    memory = train_under_limit(work / "shards_2", work, args.steps, args.limit_gb)
    print(f"training from shards under RLIMIT_AS={args.limit_gb} GB, RSS by step:")
    for step, mb in memory["rss_mb_by_step"]:
        print(f"  step {step:>6}: {mb:>6} MB")
    print(
        f"  peak RSS from step {memory['window_from_step']}: {memory['peak_rss_mb_after_step']} "
        f"MB (at that step: {memory['rss_mb_at_start_of_window']} MB)"
    )
    small = work / "small"
    generate(small, args.mem_mb / 1000, seed=1)
    timed(
        [PY, "-m", "bigmodel.prepare_data", f"source={small}", f"out={work / 'small_shards'}"],
        {"BIGMODEL_ROOT": str(work)},
        cwd=work,
    )
    steps = max(20, min(args.steps, 300))
    mem = tokens_per_s(["data=text", f"data.path={small}", "data.cache_dir=null"], work, steps)
    shards = tokens_per_s(["data=text_stream", f"data.path={work / 'small_shards'}"], work, steps)
    print(
        f"training tokens/s, {args.mem_mb} MB of text: in memory {mem:,}, from shards "
        f"{shards:,} ({shards / mem - 1:+.1%})"
    )
    result = {
        "corpus_gb": round(written / 1e9, 3),
        "prepare": prep,
        "memory": memory,
        "train_tokens_per_s": {"in_memory": mem, "shards": shards},
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
