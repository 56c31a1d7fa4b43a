"""Supervised fine-tuning on conversations (`experiment=sft`, `data=chat`), through the CLI.

The reference is transformers: its `apply_chat_template` renders and tokenizes the same
conversations, its `return_assistant_tokens_mask` (from a copy of the template whose assistant
part is marked with `{% generation %}`) gives the mask, and its model's logits give the loss that
ours must equal at learning rate 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.chat_fixtures import CHATML_MARKED, write_chat_model, write_chat_rows
from tests.conftest import run_cli, run_dirs
from tests.test_resume import EVERY_STEP, assert_same_end, resume

transformers = pytest.importorskip("transformers")

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SHORT = [
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "callbacks.throughput.window_size=2",
]


def messages_of(row: dict) -> list[dict]:
    if "messages" in row:
        return row["messages"]
    prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def reference_loss(folder: Path, conversations: list[list[dict]]) -> float:
    """Mean cross-entropy over the assistant tokens of the conversations, computed from
    transformers' own rendering, tokenization, assistant mask and logits."""
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for messages in conversations:
        out = tok.apply_chat_template(
            messages,
            chat_template=CHATML_MARKED,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids = torch.tensor([out["input_ids"]])
        mask = torch.tensor(out["assistant_masks"], dtype=torch.bool)
        # transformers' own rendering of the unmarked template is the same text
        assert tok.apply_chat_template(messages, tokenize=False) == tok.decode(ids[0])
        labels = torch.where(mask, ids[0], torch.full_like(ids[0], -100))
        with torch.no_grad():
            logits = model(ids).logits[0]
        loss = F.cross_entropy(logits[:-1], labels[1:], reduction="sum", ignore_index=-100)
        total += float(loss)
        count += int((labels[1:] != -100).sum())
    return total / count


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_sft_loss_at_lr_0_is_the_loss_from_transformers_logits(tmp_path, family):
    folder = write_chat_model(tmp_path / "model", family)
    data = write_chat_rows(tmp_path / "chat.jsonl", n=20)
    run_cli(
        "train.py",
        "experiment=sft",
        f"model.init_from={folder}",
        f"data.path={data}",
        "data.splits=[0.6,0.4,0.0]",  # rows 12-19 are the validation split: one batch of 8
        "data.batch_size=8",
        "optimizer.lr=0",
        "test=false",
        *SHORT,
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    (run,) = run_dirs(tmp_path)
    ours = json.loads((run / "metrics.json").read_text())["val/loss"]
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    theirs = reference_loss(folder, [messages_of(r) for r in rows[12:]])
    print(f"{family}: ours {ours!r} transformers {theirs!r} diff {abs(ours - theirs):.2e}")
    assert ours == pytest.approx(theirs, rel=2e-6, abs=0), (ours, theirs)


def test_lora_sft_trains_adapters_only_and_resumes_bitwise(tmp_path):
    folder = write_chat_model(tmp_path / "model", "llama")
    data = write_chat_rows(tmp_path / "chat.jsonl", n=40)
    args = [
        "experiment=sft",
        f"model.init_from={folder}",
        f"data.path={data}",
        "model.lora.rank=4",
        "optimizer.lr=1e-2",
        "data.batch_size=4",  # 9 batches an epoch: step 6 is mid-epoch of the second
        "trainer.max_steps=12",
        "trainer.val_check_interval=4",
        "trainer.check_val_every_n_epoch=null",
        "trainer.log_every_n_steps=1",
        "test=false",
        EVERY_STEP,
    ]
    proc = run_cli("train.py", *args, cwd=tmp_path, env=ONE_THREAD)
    assert "LoRA rank 4" in proc.stdout + proc.stderr
    (full,) = run_dirs(tmp_path)
    losses = [float(v) for v in _column(full, "train/loss")]
    assert losses[-1] < losses[0]
    resumed = resume(tmp_path, args, full / "steps" / "6.ckpt", env=ONE_THREAD)
    assert_same_end(full, resumed, 6, metrics=("train/loss", "val/loss"))


def _column(run: Path, key: str) -> list[str]:
    import csv

    with open(run / "csv" / "metrics.csv") as f:
        return [r[key] for r in csv.DictReader(f) if r.get(key)]


def test_bad_conversations_are_counted_and_skipped_in_one_warning_each(tmp_path):
    folder = write_chat_model(tmp_path / "model", "llama")
    data = write_chat_rows(tmp_path / "chat.jsonl", n=20)
    good = data.read_text()
    bad = [
        {"messages": [{"role": "user", "content": "no answer here"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]},
        {
            "messages": [
                {"role": "user", "content": "long " * 400},
                {"role": "assistant", "content": "ok"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "x " * 400},
            ]
        },
        {"prompt": "neither messages nor an instruction"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in bad) + "this line is not JSON\n" + good)
    common = [
        "experiment=sft",
        f"model.init_from={folder}",
        f"data.path={data}",
        "data.splits=[0.6,0.2,0.2]",
        "test=false",
        *SHORT,
    ]
    proc = run_cli("train.py", *common, cwd=tmp_path, env=ONE_THREAD)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    assert "skipped 1 lines that are not JSON (first: chat.jsonl line 6)" in out
    (warning,) = [line for line in out.splitlines() if "train split: of" in line]
    assert "of 15 conversations, 4 skipped" in warning
    assert "1 no assistant turn (first: chat.jsonl line 1)" in warning
    assert "1 unknown role (first: chat.jsonl line 2: role 'bot')" in warning
    # the long question leaves no answer within the context; the long answer is cut and kept
    assert "1 without an assistant token within the context (first: chat.jsonl line 3)" in warning
    assert "2 truncated to the context (data.overlong=truncate)" in warning
    assert "1 unknown layout" in warning

    proc = run_cli("train.py", *common, "data.overlong=skip", cwd=tmp_path, env=ONE_THREAD)
    (warning,) = [
        line for line in (proc.stdout + proc.stderr).splitlines() if "train split" in line
    ]
    assert "of 15 conversations, 5 skipped" in warning
    assert "2 longer than the context (data.overlong=skip) (first: chat.jsonl line 3)" in warning


def test_a_tokenizer_without_chat_template_needs_a_named_one(tmp_path):
    folder = write_chat_model(tmp_path / "model", "llama", template=None)
    data = write_chat_rows(tmp_path / "chat.jsonl", n=20)
    args = ["experiment=sft", f"model.init_from={folder}", f"data.path={data}", *SHORT]
    proc = run_cli("train.py", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert "has no chat template" in err[-1] and "data.template=chatml" in err[-1], err[-3:]
    # named, it trains; ChatML's markers are the tokenizer's special tokens here
    run_cli("train.py", *args, "data.template=chatml", "test=false", cwd=tmp_path)
    proc = run_cli("train.py", *args, "data.template=vicuna", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "data.template=vicuna is not a named template; they are chatml, plain" in proc.stderr


def test_chat_data_goes_with_the_chat_task_only(tmp_path):
    data = write_chat_rows(tmp_path / "chat.jsonl", n=20)
    proc = run_cli(
        "train.py",
        "data=chat",
        f"data.path={data}",
        "data.tokenizer=bpe",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "data=chat is chat conversations (loss on assistant turns)" in line, line
    assert "LanguageModel for language modelling" in line, line


def test_token_mask_matches_transformers_assistant_mask(tmp_path):
    """Our mask from the unmarked template (rendered once per assistant turn) is transformers'
    mask from the marked one, token for token, on every row."""
    from bigmodel.data.chat import ChatDataModule

    folder = write_chat_model(tmp_path / "model", "llama")
    data = write_chat_rows(tmp_path / "chat.jsonl", n=20)
    dm = ChatDataModule(path=str(data), tokenizer=str(folder), splits=(1.0, 0.0, 0.0))
    dm.setup()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(dm.examples["train"]) == len(rows)
    for row, ex in zip(rows, dm.examples["train"], strict=True):
        out = tok.apply_chat_template(
            messages_of(row),
            chat_template=CHATML_MARKED,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        assert ex.ids.tolist() == out["input_ids"]
        assert ex.mask.tolist() == [bool(m) for m in out["assistant_masks"]]
