"""Inference speed of trained checkpoints: scoring and sampling with the char GPT, int8 next to
float32, and translation decoding (greedy and beam 4).

    python bench/inference.py

Trains two short models first (`python train.py trainer.max_steps=300` and
`experiment=translation trainer.max_steps=600`), then measures, whole process where a user
would run a command:
- eval tokens/s: `eval.py` on the GPT's test split, tokens scored / the run's test time;
- generate tokens/s: `task.generate_text`, 4 x 500 new tokens, in this process;
- int8: `eval.py quantize=int8`, size, test perplexity and speed-up next to float32;
- translation: `bench/translation.py` sentences/s and BLEU, greedy and beam 4.
`--json FILE` writes the figures for bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

from common import PY, ROOT, newest_run, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_inference_"))
    env = {"BIGMODEL_ROOT": str(work)}
    timed([PY, str(ROOT / "train.py"), "trainer.max_steps=300", "test=false"], env)
    gpt = newest_run(work) / "checkpoints" / "last.ckpt"
    timed([PY, str(ROOT / "train.py"), "experiment=translation", "trainer.max_steps=600"], env)
    mt = newest_run(work) / "checkpoints" / "last.ckpt"
    result: dict = {}

    from bigmodel.checkpoints import restore

    _, dm, task = restore(str(gpt))
    dm.setup("test")
    tokens = len(dm.tokens["test"])
    t = time.perf_counter()
    task.eval()
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        for x, y in dm.test_dataloader():
            F.cross_entropy(task.net(x).flatten(0, 1), y.flatten())
    result["eval_tokens_per_s"] = round(tokens / (time.perf_counter() - t))
    t = time.perf_counter()
    task.generate_text("\n", dm.tokenizer, max_new_tokens=500, num_samples=4, seed=0)
    result["generate_tokens_per_s"] = round(4 * 500 / (time.perf_counter() - t))

    timed([PY, str(ROOT / "eval.py"), f"ckpt_path={gpt}", "quantize=int8"], env)
    q = json.loads((newest_run(work, "eval") / "metrics.json").read_text())
    result["int8"] = {
        "fp32_size_mb": round(q["fp32/size_mb"], 3),
        "int8_size_mb": round(q["size_mb"], 3),
        "fp32_test_ppl": round(q["fp32/test/ppl"], 3),
        "int8_test_ppl": round(q["test/ppl"], 3),
        "speedup": round(q["speedup"], 2),
    }

    _, out = timed([PY, str(ROOT / "bench" / "translation.py"), str(mt), "--repeat", "1"])
    for name, bleu, rate in re.findall(
        r"(greedy|beam 4): BLEU\s+([\d.]+).*?([\d.]+) sentences/s", out
    ):
        result[f"translation_{name.replace(' ', '')}"] = {
            "bleu": float(bleu),
            "sentences_per_s": float(rate),
        }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
