"""Every benchmark, one after the other, into one JSON file and the README's performance table.

    python bench/run.py                       # all of them (about 45 minutes on 2 cores)
    python bench/run.py --only startup demo   # some; the others keep their last figures
    python bench/run.py --table               # only rewrite the README table from the JSON

Run it on a quiet machine: nothing else should use the CPU meanwhile. Each benchmark is its own
script in bench/ (run one alone to see its details); this one runs them as subprocesses, keeps
their figures in bench/results.json with the machine's description (CPU model, cores, torch
version, date), and rewrites the README's table between its two markers from that file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.json"
README = ROOT / "README.md"
START, END = "<!-- performance table: bench/run.py -->", "<!-- end of the performance table -->"

# name -> the script and its arguments (each writes its figures with --json FILE)
BENCHMARKS: dict[str, list[str]] = {
    "startup": ["startup.py"],
    "demo": ["demo.py"],
    "baby_gpt": ["baby_gpt.py", "--pairs", "2"],
    "speedrun": ["speedrun.py", "--seeds", "3"],
    "levers": ["levers.py", "--steps", "300"],
    "lightning_overhead": ["lightning_overhead.py"],
    "data": ["data_throughput.py"],
    "inference": ["inference.py"],
    "serving": ["serving.py"],
    "generation": ["generation.py"],
    "generation_bf16": ["generation.py", "--dtype", "bfloat16"],
}


def machine() -> dict[str, str | int]:
    import torch

    from bigmodel.hardware import cpu_bf16_instructions

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count() or 0,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "bf16": cpu_bf16_instructions() or "none",
    }


def rows(r: dict) -> list[tuple[str, str, str]]:
    """(what, command, result) for each figure the JSON holds."""
    return [row for _, row in named_rows(r)]


def named_rows(r: dict) -> list[tuple[str, tuple[str, str, str]]]:
    """(benchmark, (what, command, result)) for each figure the JSON holds."""
    out: list = []
    done: list[tuple[str, tuple[str, str, str]]] = []

    def flush(name: str) -> None:  # the rows added since the last flush are this benchmark's
        done.extend((name, row) for row in out)
        out.clear()

    if s := r.get("startup"):
        out += [
            (
                "start-up: one-step run / `import lightning`",
                "`python bench/startup.py`",
                f"{s['one_step_s']} s / {s['import_lightning_s']} s = {s['one_step_over_import']}x",
            ),
            ("`python train.py --help`", "`python bench/startup.py`", f"{s['help_s']} s"),
        ]
    flush("startup")
    if d := r.get("demo"):
        out.append(
            (
                "default demo, wall incl. start-up",
                "`python train.py`",
                f"{d['wall_s']} s; val/ppl {d['first_val_ppl']} at step {d['first_val_step']} -> "
                f"{d['last_val_ppl']} at step {d['last_val_step']} ({d['ppl_ratio']}x); "
                f"{d['tokens_per_s']} tokens/s",
            )
        )
        if b := d.get("before"):
            out.append(
                (
                    "the default before (model=gpt, AdamW, batch 12, 1000 steps)",
                    "`python bench/demo.py`",
                    f"{b['wall_s']} s; val/ppl {b['first_val_ppl']} at step "
                    f"{b['first_val_step']} -> {b['last_val_ppl']} at step {b['last_val_step']} "
                    f"({b['ppl_ratio']}x); {b['tokens_per_s']} tokens/s",
                )
            )
    flush("demo")
    if b := r.get("baby_gpt"):
        out.append(
            (
                "baby GPT against nanoGPT's procedure, whole process",
                "`python bench/baby_gpt.py`",
                f"{b['ours_wall_s']} s / {b['ref_wall_s']} s = {b['ratio']}x (median of pairs); "
                f"val loss {b['ours_val_loss']} / {b['ref_val_loss']}; "
                f"{b['ours_ms_per_iter']} / {b['ref_ms_per_iter']} ms per iteration",
            )
        )
    flush("baby_gpt")
    if sr := r.get("speedrun"):
        if sr["ref_median_to_target_s"] is not None:
            ref_to = f"{sr['ref_median_to_target_s']} s"
        else:
            which = "every seed" if sr["ref_reached_seeds"] else "any seed"
            ref_to = f"not reached by {which} (whole run {sr['ref_median_wall_s']} s)"
        bound = " (a bound: the reference never gets there)" if sr.get("ratio_is_bound") else ""
        out.append(
            (
                f"CPU speedrun: wall to val loss {sr['target']} (whole val split), "
                f"{sr['seeds']} seeds each",
                "`python bench/speedrun.py`",
                f"experiment=char_speedrun {sr['ours_median_wall_s']} s, every seed reached: "
                f"{sr['ours_all_reached']}; nanoGPT's procedure {ref_to}; ratio "
                f"{sr.get('ratio')}x{bound}; final val loss {sr['ours_val_loss']} / "
                f"{sr['ref_val_loss']} (median, range)",
            )
        )
    flush("speedrun")
    for lever in r.get("levers", []):
        out.append(
            (
                f"lever: {lever['lever']}",
                f"`python bench/levers.py` (`{' '.join(lever['overrides'])}`)",
                f"ms/iteration x{lever['ms_ratio']}, wall x{lever['wall_ratio']}; val loss "
                f"{lever['baseline']['val_loss']:.4f} -> {lever['with']['val_loss']:.4f}"
                + (f" ({lever['note']})" if lever.get("note") else ""),
            )
        )
    flush("levers")
    if o := r.get("lightning_overhead"):
        out.append(
            (
                "Lightning against the plain loop: losses, step time",
                "`python bench/lightning_overhead.py`",
                f"{o['identical_losses']} of {o['compared_losses']} losses bit-identical; "
                f"step time ratio {o['step_time_ratio']}",
            )
        )
    flush("lightning_overhead")
    if d := r.get("data"):
        out.append(
            (
                f"image folder of {d['images']} JPEGs: first run, cached run to its first step",
                "`python bench/data_throughput.py`",
                f"{d['first_run_wall_s']} s, then {d['cached_one_step_wall_s']} s; "
                f"CNN {d['cnn_samples_per_s']} samples/s (32x32 RGB)",
            )
        )
    flush("data")
    if i := r.get("inference"):
        q = i["int8"]
        out += [
            (
                "char GPT: eval, generate",
                "`python bench/inference.py`",
                f"{i['eval_tokens_per_s']} tokens/s scored, "
                f"{i['generate_tokens_per_s']} tokens/s sampled",
            ),
            (
                "int8 next to float32 (test ppl, size, speed)",
                "`python eval.py quantize=int8`",
                f"ppl {q['fp32_test_ppl']} -> {q['int8_test_ppl']}; {q['fp32_size_mb']} -> "
                f"{q['int8_size_mb']} MB; {q['speedup']}x",
            ),
        ]
        for k in ("greedy", "beam4"):
            if t := i.get(f"translation_{k}"):
                out.append(
                    (
                        f"translation decoding, {k}",
                        "`python bench/translation.py CKPT`",
                        f"BLEU {t['bleu']}; {t['sentences_per_s']} sentences/s",
                    )
                )
    flush("inference")
    serving: dict[tuple[str, str, str], list[dict]] = {}
    for row in r.get("serving", []):
        serving.setdefault((row["model"], row["engine"], row["batching"]), []).append(row)
    for (model, engine, batching), group in serving.items():
        size = f" ({group[0]['params_m']} M)" if "params_m" in group[0] else ""
        figures = "; ".join(
            f"c={g['concurrency']}: p50 {g['p50_ms']:.1f} ms, p99 {g['p99_ms']:.1f} ms, "
            f"{g['req_s']:.0f} req/s"
            for g in group
        )
        out.append(
            (
                f"serve.py: {model}{size}, {engine}, batching {batching}",
                "`python bench/serving.py`",
                figures,
            )
        )
    flush("serving")
    for name in ("generation", "generation_bf16"):
        for g in (r.get(name) or {}).get("rows", []):
            dtype = g.get("dtype", "float32")
            floor = ""
            if "floor_decode_ms" in g:
                floor = (
                    f"; floor (the weight matmuls alone) {g['floor_decode_ms']} ms/step, "
                    f"{g['floor_weights_gb_per_s']} GB/s of weights: ours "
                    f"{g['ours_decode_over_floor']}x it, theirs {g['theirs_decode_over_floor']}x"
                )
            command = "`python bench/generation.py" + (
                " --dtype bfloat16`" if "bf16" in name else "`"
            )
            out.append(
                (
                    f"decoding, {g['model']} ({g['params_m']} M, {dtype}), batch {g['batch']}, "
                    f"{g['prompt']} + {g['new_tokens']} tokens, greedy",
                    command,
                    f"{g['ours_tokens_per_s']} tokens/s "
                    f"(decode {g['ours_decode_ms_per_step']} ms/step) "
                    f"vs transformers' generate {g['theirs_tokens_per_s']} "
                    f"({g['theirs_decode_ms_per_step']} ms/step) = {g['ratio']}x; "
                    f"same tokens: {g['same_tokens']}; cache {g['cache_bytes_per_token']} B/token"
                    + floor,
                )
            )
        flush(name)
    return done


def describe(m: dict) -> str:
    bf16 = f", bf16 instructions: {m['bf16']}" if "bf16" in m else ""
    return f"{m['cpu']}, {m['cores']} cores{bf16}, torch {m['torch']}, {m['date']}"


def table(r: dict) -> str:
    """The README table; where benchmarks ran on different machines, each row names its own."""
    of = r.get("machines") or {}
    kinds = sorted({describe(m) for m in of.values()})
    if len(kinds) <= 1:
        head = f"Measured on {kinds[0] if kinds else describe(r['machine'])} (bench/results.json)."
        label = dict.fromkeys(of, "")
    else:
        letters = {k: chr(ord("A") + i) for i, k in enumerate(kinds)}
        head = "Measured on " + "; ".join(f"({letters[k]}) {k}" for k in kinds)
        head += " (bench/results.json). Compare figures of one machine only."
        label = {name: f" ({letters[describe(m)]})" for name, m in of.items()}
    lines = [head, "", "| what | command | result |", "|---|---|---|"]
    lines += [f"| {a}{label.get(n, '')} | {b} | {c} |" for n, (a, b, c) in named_rows(r)]
    return "\n".join(lines)


def write_readme(r: dict) -> None:
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{table(r)}\n{END}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=list(BENCHMARKS), help="run these only")
    ap.add_argument("--table", action="store_true", help="rewrite the README table only")
    args = ap.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.table:
        for name, (script, *extra) in BENCHMARKS.items():
            if args.only and name not in args.only:
                continue
            print(f"== {name}", flush=True)
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                cmd = [sys.executable, str(ROOT / "bench" / script), *extra, "--json", f.name]
                subprocess.run(cmd, cwd=ROOT, check=True)
                results[name] = json.loads(Path(f.name).read_text())
            results["machine"] = machine()  # the newest; each benchmark keeps its own below
            results.setdefault("machines", {})[name] = results["machine"]
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")  # kept after each one
    write_readme(results)
    print(f"wrote {RESULTS.relative_to(ROOT)} and the README table")


if __name__ == "__main__":
    main()
