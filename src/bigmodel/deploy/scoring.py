"""int8 next to fp32: the exported graphs scored on the checkpoint's own held-out data.

Each engine (PyTorch, ONNX Runtime fp32, ONNX Runtime int8) scores the same batches of the data
split the checkpoint's config names (`data.split`, the test split unless changed): accuracy for
classifiers, MSE for regressors, cross-entropy per token for language models, BLEU of greedy
translations for seq2seq models.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from bigmodel.deploy.runtime import Runner


def _score(runner: Runner, batches: list) -> dict[str, float]:
    kind = runner.kind
    if kind in ("image", "audio"):
        right = total = 0
        for x, y in batches:
            x = x.float() / 255 if kind == "image" else x.float()  # images are held as uint8
            pred = runner.classify(x.numpy()).argmax(-1)
            right += int((torch.from_numpy(pred) == y).sum())
            total += len(y)
        return {"acc": right / total}
    if kind == "regression":
        se = n = 0.0
        for x, y in batches:
            pred = torch.from_numpy(runner.forward(x.float().numpy())).view_as(y)
            se += float(((pred - y) ** 2).sum())
            n += y.numel()
        return {"mse": se / n}
    if kind == "lm":
        nll = n = 0.0
        for x, y in batches:
            logits = runner.all_logits(x)  # (B, T, V)
            nll += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            n += y.numel()
        return {"loss": nll / n, "ppl": math.exp(nll / n)}
    from torchmetrics.text import SacreBLEUScore

    bleu = SacreBLEUScore()
    for batch in batches:
        hyps = runner.translate(list(batch["src_text"]), beam_size=1)
        bleu.update(hyps, [[r] for r in batch["tgt_text"]])
    return {"bleu": float(bleu.compute()) * 100}


def score_engines(bundle, datamodule, max_batches: int) -> dict:
    """{"what", "metrics", "engines": {engine: {metric: value}}} for torch, onnx fp32 and int8."""
    datamodule.setup("test")
    split = datamodule.split
    batches = list(itertools.islice(datamodule.test_dataloader(), max_batches))
    n = sum(len(b["src_text"]) if isinstance(b, dict) else len(b[1]) for b in batches)
    engines = {
        "torch fp32": Runner(bundle, "torch"),
        "onnx fp32": Runner(bundle, "onnx"),
        "onnx int8": Runner(bundle, "onnx", int8=True),
    }
    scores = {name: _score(r, batches) for name, r in engines.items()}
    return {
        "what": f"{split} split, {n} examples",
        "metrics": list(next(iter(scores.values()))),
        "engines": scores,
    }
