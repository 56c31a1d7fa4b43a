"""Serving benchmark: p50 / p99 latency and throughput of serve.py from a real HTTP client.

    python bench/serve.py --digits logs/train/runs/<digits_cnn run>/checkpoints/last.ckpt \
        --gpt logs/train/runs/<char gpt run>/checkpoints/last.ckpt \
        --llama logs/train/runs/<model=llama run>/checkpoints/last.ckpt

`--llama` is any other language model, a Llama-style one (bench/serving.py trains a 25 M one):
it gets the GPT's requests, on PyTorch only unless `--llama-engines` says more (PyTorch decodes
the requests of a batch together from one key/value cache, ONNX Runtime one after another).
For each model, engine (PyTorch from the checkpoint, ONNX Runtime from a folder export.py writes
here) and batching (on: `max_batch_size`, `batch_timeout`; off: one request at a time), it
starts `serve.py` as a subprocess on a free loopback port, waits for GET /health, and sends
POST /predict requests from `concurrency` client threads (1, 8, 32): each setting ends after
`--requests` requests or `--seconds` seconds, whichever comes first. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """serve.py with the given settings, healthy on return; `stop()` sends SIGTERM."""

    def __init__(self, args: list[str], cwd: Path, threads: int) -> None:
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.log = open(cwd / f"serve_{self.port}.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "serve.py"), f"port={self.port}", *args],
            cwd=cwd,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.close()
                tail = (cwd / f"serve_{self.port}.log").read_text()[-2000:]
                raise SystemExit(
                    f"serve.py {' '.join(args)} exited {self.proc.returncode}:\n{tail}"
                )
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise SystemExit("serve.py did not become healthy in 180 s")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def post(url: str, body: bytes) -> float:
    """One request -> its latency in seconds (an answer other than 200 stops the benchmark)."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
        if r.status != 200:
            raise SystemExit(f"{url} answered {r.status}")
    return time.perf_counter() - t0


def drive(url: str, body: bytes, concurrency: int, requests: int, seconds: float) -> dict:
    """`concurrency` threads send requests until `requests` are done or `seconds` have passed."""
    latencies: list[float] = []
    lock, left = threading.Lock(), [requests]
    deadline = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < deadline:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            dt = post(url, body)
            with lock:
                latencies.append(dt)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "n": len(lat),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "req_s": len(lat) / wall,
    }


def digits_body() -> bytes:
    from PIL import Image
    from sklearn.datasets import load_digits

    img = np.round(load_digits().images[0] * (255 / 16)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return json.dumps({"image": base64.b64encode(buf.getvalue()).decode()}).encode()


def gpt_body(max_new_tokens: int) -> bytes:
    return json.dumps({"prompt": "The ", "max_new_tokens": max_new_tokens}).encode()


def params_m(ckpt: str) -> float:
    """The net's parameters in millions, from the checkpoint (a tied head counted once: it
    shares its storage with the embedding there too)."""
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    unique = {t.data_ptr(): t.numel() for k, t in state.items() if k.startswith("net.")}
    return round(sum(unique.values()) / 1e6, 1)


def export_onnx(ckpt: str, out: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "export.py"), f"ckpt_path={ckpt}", "format=onnx", f"out={out}"],
        check=True,
        capture_output=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digits", help="a digits_cnn checkpoint")
    ap.add_argument("--gpt", help="a char GPT checkpoint")
    ap.add_argument("--llama", help="a Llama-style language model checkpoint")
    ap.add_argument("--llama-engines", nargs="+", default=["torch"], help="of --engines")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=400, help="at most, per setting")
    ap.add_argument("--seconds", type=float, default=30, help="at most, per setting")
    ap.add_argument("--warmup", type=int, default=10, help="untimed requests first")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-timeout", type=float, default=0.005)
    ap.add_argument("--max-new-tokens", type=int, default=32, help="GPT requests")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    ap.add_argument("--engines", nargs="+", default=["torch", "onnx"])
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    given = (("digits", args.digits), ("gpt", args.gpt), ("llama", args.llama))
    models = {k: str(Path(v).resolve()) for k, v in given if v}
    if not models:
        raise SystemExit("give --digits CKPT, --gpt CKPT and/or --llama CKPT")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, ckpt in models.items():
            body = digits_body() if name == "digits" else gpt_body(args.max_new_tokens)
            engines = [e for e in args.engines if name != "llama" or e in args.llama_engines]
            millions = params_m(ckpt)
            if "onnx" in engines:
                export_onnx(ckpt, work / name)
            for engine in engines:
                source = f"ckpt_path={ckpt}" if engine == "torch" else f"model_dir={work / name}"
                for batching in ("on", "off"):
                    size = args.max_batch_size if batching == "on" else 1
                    server = Server(
                        [
                            source,
                            f"engine={engine}",
                            f"max_batch_size={size}",
                            f"batch_timeout={args.batch_timeout}",
                            "max_new_tokens_limit=100000",
                            "max_concurrent_tokens=null",  # every request served, none refused
                        ],
                        work,
                        args.threads,
                    )
                    try:
                        url = server.url("/predict")
                        for _ in range(args.warmup):
                            post(url, body)
                        for c in args.concurrency:
                            r = drive(url, body, c, args.requests, args.seconds)
                            row = {
                                "model": name,
                                "params_m": millions,
                                "engine": engine,
                                "batching": batching,
                                "concurrency": c,
                                **r,
                            }
                            rows.append(row)
                            print(
                                f"{name:6} {engine:5} batching {batching:3} c={c:<3} n={r['n']:<5} "
                                f"p50 {r['p50_ms']:8.1f} ms  p99 {r['p99_ms']:8.1f} ms  "
                                f"{r['req_s']:8.1f} req/s",
                                flush=True,
                            )
                    finally:
                        server.stop()
    print("\n| model | engine | batching | concurrency | p50 ms | p99 ms | requests/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} ({r['params_m']} M) | {r['engine']} | {r['batching']} | "
            f"{r['concurrency']} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['req_s']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
