"""From a base model to an assistant, end to end and small: pre-train, SFT, DPO, each measured.

    python bench/post_training.py [--json FILE]

1. A Llama-style model (random, with a ChatML BPE tokenizer, written by transformers) is
   pre-trained on the embedded corpus: `train.py experiment=finetune model.init_from=DIR`.
2. SFT on generated instructions ("Reverse the word apple.", "What is 3 plus 4?"), each with one
   right answer: `train.py experiment=sft model.init_from=CKPT`. Accuracy is exact-match of the
   greedy answer (the chat template, decoded from the key/value cache, as chat.py answers) on
   held-out instructions, before SFT and after.
3. DPO on generated pairs (the right answer chosen, a wrong one rejected):
   `train.py experiment=dpo model.init_from=SFT_CKPT`. Reward accuracy on held-out pairs is the
   share where the model's log-probability margin of chosen over rejected grows from the SFT
   model's (DPO's implicit reward, beta x that growth, is positive): before DPO it is 0 by
   definition (the model is its own reference); also the share where the model itself prefers
   the chosen reply, before and after.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from common import PY, ROOT, newest_run, timed

sys.path.insert(0, str(ROOT))

from tests.chat_fixtures import instruction, write_chat_model  # noqa: E402
from tests.test_pretrained import write_text  # noqa: E402


def rows(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [instruction(rng) for _ in range(n)]


def write_sft(path: Path, pairs: list[tuple[str, str]]) -> None:
    lines = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in pairs
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


def wrong(a: str, rng: random.Random) -> str:
    return a[::-1] + "x" if not a.isdigit() else str(int(a) + rng.randint(1, 5))


def write_prefs(path: Path, pairs: list[tuple[str, str]], seed: int) -> None:
    rng = random.Random(seed)
    lines = [{"prompt": q, "chosen": a, "rejected": wrong(a, rng)} for q, a in pairs]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


def assistant(ckpt: Path):
    from bigmodel.deploy.assistant import Assistant
    from bigmodel.deploy.bundle import from_checkpoint

    bundle = from_checkpoint(str(ckpt))
    return bundle, Assistant.from_bundle(bundle, template="chatml")


def accuracy(ckpt: Path, pairs: list[tuple[str, str]]) -> float:
    """Exact-match share of greedy answers, decoded together as serve.py's /v1 does."""
    from bigmodel.deploy.assistant import replies
    from bigmodel.sampling import RowSampling

    bundle, a = assistant(ckpt)
    jobs = [
        a.job(
            a.chat_prompt([{"role": "user", "content": q}]),
            RowSampling(16, temperature=0.0),
            [],
            chat=True,
        )
        for q, _ in pairs
    ]
    texts = [""] * len(jobs)
    for step in replies(bundle.net, a.tokenizer, jobs, a.block_size):
        for i, s in enumerate(step):
            if s is not None:
                texts[i] += s.text
    return sum(t.strip() == ans for t, (_, ans) in zip(texts, pairs, strict=True)) / len(pairs)


@torch.no_grad()
def margins(ckpt: Path, prefs: list[tuple[str, str, str]]) -> torch.Tensor:
    """log p(chosen) - log p(rejected) of each pair's reply tokens after its chat prompt."""
    bundle, a = assistant(ckpt)
    net = bundle.net.eval()
    out = []
    for q, chosen, rejected in prefs:
        prompt = a.chat_prompt([{"role": "user", "content": q}])
        logp = []
        for reply in (chosen, rejected):
            ids = a.chat_prompt(
                [{"role": "user", "content": q}, {"role": "assistant", "content": reply}]
            )
            x = torch.tensor([ids[:-1]])
            lp = F.log_softmax(net(x).float(), -1)[0]
            target = torch.tensor(ids[1:])
            scored = torch.arange(len(prompt) - 1, len(ids) - 1)
            logp.append(lp[scored, target[scored]].sum())
        out.append(logp[0] - logp[1])
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--sft-steps", type=int, default=600)
    ap.add_argument("--dpo-steps", type=int, default=150)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_post_training_"))
    env = {"BIGMODEL_ROOT": str(work)}
    sizes = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                 num_attention_heads=4, max_position_embeddings=128)  # fmt: skip
    base = write_chat_model(work / "base", sizes=sizes)
    corpus = write_text(work / "corpus.txt", 400_000)
    common = ["model.net.block_size=128", "trainer.val_check_interval=100", "test=false"]
    timed([PY, str(ROOT / "train.py"), "experiment=finetune", f"model.init_from={base}",
           f"data.path={corpus}", f"trainer.max_steps={args.pretrain_steps}",
           "optimizer.lr=3e-3", *common], env)  # fmt: skip
    pretrained = newest_run(work) / "checkpoints" / "last.ckpt"

    # every instruction there is (453), a fifth of them held out: never seen in SFT or DPO
    questions = sorted(set(rows(20_000, seed=0)))
    random.Random(1).shuffle(questions)
    held_out, seen = questions[: len(questions) // 5], questions[len(questions) // 5 :]
    train_rows = [random.Random(i).choice(seen) for i in range(3000)]
    write_sft(work / "sft.jsonl", train_rows)
    timed([PY, str(ROOT / "train.py"), "experiment=sft", f"model.init_from={pretrained}",
           f"data.path={work / 'sft.jsonl'}", "data.template=chatml",
           f"trainer.max_steps={args.sft_steps}", "optimizer.lr=3e-3", *common], env)  # fmt: skip
    sft = newest_run(work) / "checkpoints" / "last.ckpt"

    write_prefs(work / "prefs.jsonl", [random.Random(-i).choice(seen) for i in range(3000)], 3)
    timed([PY, str(ROOT / "train.py"), "experiment=dpo", f"model.init_from={sft}",
           f"data.path={work / 'prefs.jsonl'}", f"trainer.max_steps={args.dpo_steps}",
           "optimizer.lr=1e-4", *common], env)  # fmt: skip
    dpo = newest_run(work) / "checkpoints" / "last.ckpt"

    rng = random.Random(4)
    prefs = [(q, a, wrong(a, rng)) for q, a in held_out]
    m_sft, m_dpo = margins(sft, prefs), margins(dpo, prefs)
    result = {
        "held_out": len(held_out),
        "accuracy_pretrained": accuracy(pretrained, held_out),
        "accuracy_sft": accuracy(sft, held_out),
        "accuracy_dpo": accuracy(dpo, held_out),
        "prefers_chosen_sft": float((m_sft > 0).float().mean()),
        "prefers_chosen_dpo": float((m_dpo > 0).float().mean()),
        "reward_accuracy_before_dpo": 0.0,
        "reward_accuracy_after_dpo": float((m_dpo > m_sft).float().mean()),
        "steps": {"pretrain": args.pretrain_steps, "sft": args.sft_steps, "dpo": args.dpo_steps},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
