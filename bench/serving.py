"""bench/serve.py on three models this script trains first: the digits CNN, the char GPT and a
~25 M-parameter Llama-style decoder.

    python bench/serving.py --seconds 5
    python bench/serving.py --quick          # tiny models, a few requests: checks that it runs

Trains `experiment=digits_cnn` and the default char GPT briefly, and `model=llama` widened and
deepened to ~25 M parameters (width 384, 14 layers, 6 query heads over 2 key/value heads, SwiGLU
1024, the embedded corpus's BPE vocabulary of ~8.8 k tokens) for one step: its weights are as
good as random, which is all a serving benchmark needs (every request decodes `--max-new-tokens`
tokens whatever they are). Then runs bench/serve.py (a real HTTP client against serve.py on
loopback) on the three, batching on and off, at concurrency 1, 8 and 32: the digits CNN and the
char GPT on PyTorch and ONNX Runtime, the Llama on PyTorch. `--json FILE` writes its rows for
bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import PY, ROOT, newest_run, timed

# model=llama at ~25 M parameters (the width, heads and MLP of bench/generation.py's llama_25m;
# more layers where the embedded corpus's BPE vocabulary is smaller than its 32 k)
LLAMA_25M = [
    "model=llama",
    "data.tokenizer=bpe",
    "data.vocab_size=32000",
    "model.net.n_embd=384",
    "model.net.n_head=6",
    "model.net.n_kv_head=2",
    "model.net.intermediate_size=1024",
    "model.net.n_layer=14",
    "model.net.block_size=256",
]
QUICK_LLAMA = ["model=llama", "model.net.n_layer=2", "model.net.n_embd=64"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5, help="at most, per setting")
    ap.add_argument("--requests", type=int, default=200, help="at most, per setting")
    ap.add_argument("--quick", action="store_true", help="tiny models, 8 requests per setting")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    env = {"BIGMODEL_ROOT": str(work)}

    def train(*overrides: str) -> str:
        timed([PY, str(ROOT / "train.py"), *overrides, "test=false"], env)
        return str(newest_run(work) / "checkpoints" / "last.ckpt")

    digits = train("experiment=digits_cnn", f"trainer.max_epochs={1 if args.quick else 3}")
    gpt = train(f"trainer.max_steps={5 if args.quick else 300}")
    llama = train(*(QUICK_LLAMA if args.quick else LLAMA_25M), "trainer.max_steps=1")
    out = work / "rows.json"
    cmd = [PY, str(ROOT / "bench" / "serve.py"), f"--digits={digits}", f"--gpt={gpt}"]
    cmd += [f"--llama={llama}", f"--json={out}"]
    if args.quick:
        cmd += ["--seconds=3", "--requests=8", "--warmup=1", "--engines", "torch"]
    else:
        cmd += [f"--seconds={args.seconds}", f"--requests={args.requests}"]
    _, printed = timed(cmd)
    print(printed)
    if args.json:
        Path(args.json).write_text(json.dumps(json.loads(out.read_text()), indent=1))


if __name__ == "__main__":
    main()
