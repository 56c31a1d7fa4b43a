"""Decoding speed from the key/value cache against transformers' `generate`, same weights, same
threads, one process, alternating.

    python bench/generation.py                 # a ~25 M Llama-style model and SmolLM2-135M's shape
    python bench/generation.py --quick         # a tiny model, to check the script runs

For each model (random weights, built by transformers and read into ours by the Llama adapter):
a 64-token prompt, 256 new tokens, greedy, batch 1 and 8. Reported per side: prefill ms (the
prompt's forward), decode ms per step (each step makes one token per row) and tokens/s over
the whole generation; the ratio is ours over transformers' tokens/s. Each figure is the median
of `--repeats` alternating runs after one warm-up of each. The outputs are checked equal first
(greedy: the same tokens). Also the cache's bytes per token, and the floor of a decode step: the
net's weight matmuls alone (every Linear and the head applied to one token per row, nothing else),
which at batch 1 reads every weight once and so is bound by memory bandwidth; each side's decode
step is reported over it. `--dtype bfloat16` runs both sides with bf16 weights. `--json FILE`
writes the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

MODELS = {
    # ~25 M parameters, Llama-style (GQA, SwiGLU, RMSNorm, rotary), a 32k vocabulary
    "llama_25m": dict(
        vocab_size=32000,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    # SmolLM2-135M's shape
    "smollm2_135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}


def build(name: str, folder: Path):
    import transformers

    from bigmodel.nets import GPT
    from bigmodel.pretrained import hf

    config = transformers.LlamaConfig(max_position_embeddings=512, **MODELS[name])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    net = GPT(**hf.net_config(folder))
    hf.load_weights(net, folder)
    return net.eval(), model


def ours(net, idx: torch.Tensor, new: int) -> tuple[float, float, torch.Tensor]:
    """(prefill s, decode s, ids) of greedy decoding from our cache."""
    from bigmodel.sampling import next_token

    with torch.no_grad():
        t0 = time.perf_counter()
        cache = net.new_cache(idx.shape[0], idx.shape[1] + new)
        logits = net(idx, cache=cache)[:, -1]
        t1 = time.perf_counter()
        out = [next_token(logits, 0.0)]
        for _ in range(new - 1):
            out.append(next_token(net(out[-1], cache=cache)[:, -1], 0.0))
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, torch.cat([idx, *out], dim=1)


def theirs(model, idx: torch.Tensor, new: int) -> tuple[float, float, torch.Tensor]:
    """(prefill s, decode s, ids) of transformers' greedy generate; prefill timed as the
    prompt's forward with a cache, decode as the rest of generate's time."""
    with torch.no_grad():
        t0 = time.perf_counter()
        model(idx, use_cache=True)
        t1 = time.perf_counter()
        ids = model.generate(
            idx,
            attention_mask=torch.ones_like(idx),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
        t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) - (t1 - t0), ids


def floor_ms(net, batch: int, repeats: int = 30) -> tuple[float, int]:
    """(ms, bytes): one pass of the net's weight matmuls at one token per row, and the bytes of
    those weights: what a decode step cannot go below without reading fewer bytes."""
    weights = [m.weight for m in net.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(batch, w.shape[1], dtype=w.dtype) for w in weights]
    times = []
    with torch.no_grad():
        for i in range(repeats + 3):
            t = time.perf_counter()
            for x, w in zip(xs, weights, strict=True):
                torch.nn.functional.linear(x, w)
            if i >= 3:  # after a warm-up
                times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times), sum(w.numel() * w.element_size() for w in weights)


def measure(name: str, batch: int, prompt: int, new: int, repeats: int, dtype=None) -> dict:
    with tempfile.TemporaryDirectory() as d:
        net, model = build(name, Path(d))
    if dtype is not None:
        net, model = net.to(dtype), model.to(dtype)
    idx = torch.randint(0, MODELS[name]["vocab_size"], (batch, prompt))
    a, b = ours(net, idx, new), theirs(model, idx, new)  # warm-up, and the same tokens
    same = torch.equal(a[2], b[2])
    runs: dict[str, list] = {"ours": [], "theirs": []}
    for _ in range(repeats):
        runs["ours"].append(ours(net, idx, new)[:2])
        runs["theirs"].append(theirs(model, idx, new)[:2])
    out: dict = {"model": name, "batch": batch, "prompt": prompt, "new_tokens": new}
    out["params_m"] = round(sum(p.numel() for p in net.parameters()) / 1e6, 1)
    out["same_tokens"] = same
    for side, rs in runs.items():
        prefill = statistics.median(r[0] for r in rs)
        decode = statistics.median(r[1] for r in rs)
        out[f"{side}_prefill_ms"] = round(1000 * prefill, 1)
        out[f"{side}_decode_ms_per_step"] = round(1000 * decode / (new - 1), 2)
        out[f"{side}_tokens_per_s"] = round(batch * new / (prefill + decode), 1)
    out["ratio"] = round(out["ours_tokens_per_s"] / out["theirs_tokens_per_s"], 2)
    out["cache_bytes_per_token"] = net.new_cache(1, 1).bytes_per_token()
    floor, nbytes = floor_ms(net, batch)
    out["dtype"] = str(net.wte.weight.dtype).removeprefix("torch.")
    out["floor_decode_ms"] = round(floor, 3)
    out["floor_weights_gb_per_s"] = round(nbytes / floor / 1e6, 1)
    for side in ("ours", "theirs"):
        out[f"{side}_decode_over_floor"] = round(out[f"{side}_decode_ms_per_step"] / floor, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model, 32 new tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--models", nargs="*", help="of: " + ", ".join(MODELS))
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    names = args.models or (["tiny"] if args.quick else ["llama_25m", "smollm2_135m"])
    dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    new = 32 if args.quick else 256
    rows = []
    for name in names:
        for batch in (1, 8):
            row = measure(name, batch, 64, new, 1 if args.quick else args.repeats, dtype)
            rows.append(row)
            print(json.dumps(row))
    result = {"threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
