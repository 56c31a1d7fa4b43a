"""Decoding benchmark: test BLEU and sentences per second, greedy and beam search, of a checkpoint.

    python bench/translation.py logs/train/runs/<run>/checkpoints/last.ckpt --beams 1 4

Decodes the checkpoint's own test split (batched as eval.py does) and scores it with sacrebleu.
"""

from __future__ import annotations

import argparse
import time

import sacrebleu
import torch

from bigmodel.checkpoints import restore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2, help="timed passes; the fastest is reported")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _, dm, task = restore(args.ckpt)
    dm.setup("test")
    src, ref = (list(x) for x in zip(*dm.pairs[dm.split], strict=True))
    # Sort by length, as the eval loader batches, so a batch pads little.
    order = sorted(range(len(src)), key=lambda i: len(src[i]))
    src, ref = [src[i] for i in order], [ref[i] for i in order]
    print(f"{len(src)} {dm.split} sentences, {torch.get_num_threads()} threads")
    for k in args.beams:
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            hyp = task.translate(src, dm.tokenizer, beam_size=k, batch_size=args.batch_size)
            best = min(best, time.perf_counter() - t0)
        bleu = sacrebleu.corpus_bleu(hyp, [ref]).score
        chrf = sacrebleu.corpus_chrf(hyp, [ref]).score
        name = "greedy" if k == 1 else f"beam {k}"
        print(f"{name:>8}: BLEU {bleu:6.2f}  chrF {chrf:6.2f}  {len(src) / best:8.1f} sentences/s")


if __name__ == "__main__":
    main()
