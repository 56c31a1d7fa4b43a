"""Text sources, tokenizers, the token-id cache and window sampling."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bigmodel.data.sources.text_files import embedded_corpus
from bigmodel.data.text import TextDataModule
from bigmodel.data.tokenizers import BPETokenizer, CharTokenizer, tokenizer_from_dict
from bigmodel.errors import UserError
from bigmodel.nets import GPT
from tests.conftest import TINY_LM, run_cli, run_dirs

PROSE = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity.\n"
) * 40


def dm(**kw) -> TextDataModule:
    return TextDataModule(**{"block_size": 16, "batch_size": 4, **kw})


def test_embedded_corpus_is_english_prose():
    text = embedded_corpus()
    assert len(text) > 100_000 and " the " in text


def test_char_and_bpe_tokenizers_round_trip():
    char = CharTokenizer.train(PROSE)
    assert char.decode(char.encode("it was")) == "it was"
    bpe = BPETokenizer.train(PROSE.splitlines(), vocab_size=300)
    ids = bpe.encode("it was the age of wisdom, Ünïcode too")
    assert bpe.decode(ids) == "it was the age of wisdom, Ünïcode too"  # byte-level: nothing unknown
    assert len(ids) < len("it was the age of wisdom, Ünïcode too")  # merges were learned
    again = tokenizer_from_dict(bpe.to_dict())
    assert again.encode("the epoch of belief") == bpe.encode("the epoch of belief")
    assert char.encode("a\u2603") == [char.stoi["a"], char.unk_id]  # unseen: unknown id
    with pytest.raises(UserError, match="not in the character vocabulary"):
        char.encode("\u2603", strict=True)  # how prompts are encoded


def test_char_vocabulary_comes_from_the_training_split(tmp_path, caplog):
    snow = "\u2603"
    text = PROSE + "the snowman " + snow + " melts." + PROSE[:200]
    assert text.index(snow) > 0.95 * len(text)  # only in the test split
    f = tmp_path / "c.txt"
    f.write_text(text)
    d = dm(path=str(f), cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="bigmodel"):
        d.setup("fit")
    parts = d.split_text(text)
    assert snow in parts["test"] and snow not in parts["train"] + parts["val"]
    tok = d.tokenizer
    assert snow not in tok.chars
    assert tok.chars == "".join(sorted(set(parts["train"]) | {CharTokenizer.UNK}))
    # the test split: every character scored, the unseen one as the unknown id
    test = np.asarray(d.tokens["test"])
    assert len(test) == len(parts["test"]) and int(test.max()) < tok.vocab_size
    assert (test == tok.unk_id).sum() == 1 and (np.asarray(d.tokens["train"]) != tok.unk_id).all()
    assert tok.decode(test.tolist()) == parts["test"].replace(snow, CharTokenizer.UNK)
    (warning,) = [r.getMessage() for r in caplog.records if "outside the character" in r.message]
    assert warning.startswith(f"the test split has 1 characters (1 distinct: {snow!r})")
    # perplexity on it is finite
    torch.manual_seed(0)
    net = GPT(vocab_size=d.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=8)
    x, y = next(iter(d.test_dataloader()))
    assert torch.isfinite(F.cross_entropy(net(x).flatten(0, 1), y.flatten()))
    # the checkpoint's tokenizer round-trips; a run restored with it reads the same cached ids
    state = d.state_dict()
    assert state["tokenizer"] == {"type": "char", "chars": tok.chars, "unk": CharTokenizer.UNK}
    again = dm(path=str(f), cache_dir=str(tmp_path / "cache"))
    again.load_state_dict(json.loads(json.dumps(state)))
    again.setup("test")
    assert isinstance(again.tokens["test"], np.memmap)
    np.testing.assert_array_equal(again.tokens["test"], test)
    # a checkpoint from before the unknown id (vocabulary of the whole corpus) still works
    old = dm(path=str(f), cache_dir=str(tmp_path / "cache"))
    old.load_state_dict({"tokenizer": {"type": "char", "chars": "".join(sorted(set(text)))}})
    old.setup("test")
    assert old.tokenizer.unk is None and old.tokenizer.decode(old.tokens["test"]) == parts["test"]


def test_file_folder_glob_sources_and_contiguous_splits(tmp_path):
    (tmp_path / "corpus").mkdir()
    for i in range(3):
        (tmp_path / "corpus" / f"part{i}.txt").write_text(PROSE)
    single = tmp_path / "corpus" / "part0.txt"
    for path in (str(single), str(tmp_path / "corpus"), str(tmp_path / "corpus" / "*.txt")):
        d = dm(path=path)
        d.setup("fit")
        n = sum(len(d.tokens[s]) for s in ("train", "val", "test"))
        assert n == len(d.load_text())  # char level: one token per character, nothing dropped
        assert len(d.tokens["train"]) == int(n * 0.9)
    assert len(dm(path=str(tmp_path / "corpus")).load_text()) > 3 * len(PROSE)


def test_hf_parquet_and_json_sources(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [PROSE[i : i + 500] for i in range(0, len(PROSE), 500)]
    pq.write_table(pa.table({"body": rows, "id": list(range(len(rows)))}), tmp_path / "d.parquet")
    d = dm(path=str(tmp_path / "d.parquet"), text_column="body")
    d.setup("fit")
    assert "epoch of belief" in d.load_text()
    with pytest.raises(UserError, match="no column 'text'"):
        dm(path=str(tmp_path / "d.parquet")).setup("fit")

    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": r}) for r in rows))
    d = dm(path=str(tmp_path / "d.jsonl"), tokenizer="bpe", vocab_size=300)
    d.setup("fit")
    assert d.vocab_size <= 300 and len(d.tokens["train"]) > 0


def test_token_cache_is_written_once_and_memory_mapped(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text(PROSE)
    d = dm(path=str(f), cache_dir=str(tmp_path / "cache"))
    d.setup("fit")
    (entry,) = (tmp_path / "cache" / "text").iterdir()
    files = sorted(entry.iterdir())
    assert [p.name for p in files] == ["meta.json", "test.npy", "train.npy", "val.npy"]
    mtimes = [p.stat().st_mtime_ns for p in files]
    d2 = dm(path=str(f), cache_dir=str(tmp_path / "cache"))
    d2.setup("fit")
    assert isinstance(d2.tokens["train"], np.memmap)
    assert [p.stat().st_mtime_ns for p in files] == mtimes  # read back, not rewritten
    np.testing.assert_array_equal(d.tokens["val"], d2.tokens["val"])
    assert d2.tokenizer.to_dict() == d.tokenizer.to_dict()  # the tokenizer comes from the entry
    # another tokenizer is another cache entry
    dm(path=str(f), cache_dir=str(tmp_path / "cache"), tokenizer="bpe", vocab_size=280).setup("fit")
    assert len(list((tmp_path / "cache" / "text").iterdir())) == 2


# ------------------------------------------------------------------ what a text run reads, once
# A tiny run that reads its data and stops: the data step is what these tests look at.
READ_ONLY = [*TINY_LM, "trainer.max_steps=1", "test=false"]
STATS = re.compile(
    r"text \(data\.path=(?P<path>.+)\): (?P<files>\d+) files?, (?P<chars>\d+) characters, "
    r"(?P<kind>char|BPE) vocabulary of (?P<vocab>\d+); tokens "
    r"\(train (?P<train>\d+), val (?P<val>\d+), test (?P<test>\d+)\)"
)
HIT = "text: {n} tokenized earlier, memory-mapped from "
READ = re.compile(r"text: read (\d+) characters and tokenized them in")


def text_run(tmp_path: Path, *args: str) -> str:
    out = run_cli("train.py", *READ_ONLY, *args, cwd=tmp_path)
    return out.stdout + out.stderr


def stats(out: str) -> dict[str, str]:
    (m,) = STATS.finditer(out)  # said once
    return m.groupdict()


def test_a_text_run_says_what_it_read(tmp_path):
    text = (PROSE + "Zebras \u00e9t\u00e9.\n") * 3
    (tmp_path / "corpus.txt").write_text(text)
    got = stats(text_run(tmp_path, "data.path=corpus.txt"))
    n = len(text)
    train, val = text[: int(n * 0.9)], text[int(n * 0.9) : int(n * 0.95)]
    assert got == {
        "path": str(tmp_path / "corpus.txt"),  # the config holds paths absolute
        "files": "1",
        "chars": str(n),
        "kind": "char",
        "vocab": str(len(set(train)) + 1),  # the training split's characters and the unknown
        "train": str(len(train)),  # char level: a token a character
        "val": str(len(val)),
        "test": str(n - len(train) - len(val)),
    }


def test_bpe_is_trained_and_tokenized_once_and_a_changed_file_invalidates(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(PROSE * 2)
    bpe = ["data.path=corpus.txt", "data.tokenizer=bpe", "data.vocab_size=300"]
    first = text_run(tmp_path, *bpe)
    assert READ.search(first) and HIT.format(n="1 file") not in first
    (entry,) = (tmp_path / ".cache" / "text").iterdir()
    written = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    assert (
        "meta.json" in written
        and "tokenizer" in json.loads((entry / "meta.json").read_text())["meta"]
    )

    second = text_run(tmp_path, *bpe)
    # neither read nor trained: the tokenizer and the ids come from the entry, left as they were
    assert not READ.search(second) and HIT.format(n="1 file") + str(entry) in second
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == written
    assert stats(second) == stats(first)
    run1, run2 = run_dirs(tmp_path)
    assert (run1 / "tokenizer.json").read_text() == (run2 / "tokenizer.json").read_text()

    # the same size, another modification time: read and tokenized again, into a new entry
    st = corpus.stat()
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = text_run(tmp_path, *bpe)
    assert READ.search(third) and HIT.format(n="1 file") not in third
    assert len(list((tmp_path / ".cache" / "text").iterdir())) == 2


def test_a_file_added_to_a_folder_is_read(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    for i in range(3):
        (folder / f"part{i}.txt").write_text(PROSE)
    first = text_run(tmp_path, "data.path=books")
    assert stats(first)["files"] == "3" and READ.search(first)
    assert HIT.format(n="3 files") in text_run(tmp_path, "data.path=books")
    (folder / "part3.txt").write_text(PROSE + "Quixotic zephyrs.\n")
    again = text_run(tmp_path, "data.path=books")
    got = stats(again)
    assert READ.search(again) and got["files"] == "4"
    assert int(got["chars"]) == 4 * len(PROSE) + len("Quixotic zephyrs.\n") + 3 * len("\n\n")
    (folder / "part3.txt").unlink()  # and one removed: the three-file entry again
    assert HIT.format(n="3 files") in text_run(tmp_path, "data.path=books")


def test_windows_train_random_eval_deterministic(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text(PROSE)
    d = dm(path=str(f))
    d.setup("fit")
    x, y = next(iter(d.train_dataloader()))
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])  # targets shifted by one
    v1 = [b[0] for b in d.val_dataloader()]
    v2 = [b[0] for b in d.val_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(v1, v2, strict=True))
    ds = d.train_dataloader().dataset
    first = ds.offsets.clone()
    ds.set_epoch(1)
    assert not torch.equal(first, ds.offsets)  # each epoch draws new windows
    ds.set_epoch(0)
    assert torch.equal(first, ds.offsets)  # ... reproducibly


def test_capped_eval_windows_are_spread_over_the_whole_split():
    from bigmodel.data.text import StridedWindows

    tokens = np.arange(1001, dtype=np.uint16)  # 100 windows of 10
    full = StridedWindows(tokens, 10)
    assert len(full) == 100 and [full[i][0][0].item() for i in (0, 99)] == [0, 990]
    capped = StridedWindows(tokens, 10, max_windows=4)
    starts = [capped[i][0][0].item() for i in range(len(capped))]
    assert starts == [0, 250, 500, 750]  # not the first four: the split's every quarter
    y = capped[3][1]
    assert y[0].item() == 751 and len(y) == 10
    assert len(StridedWindows(tokens, 10, max_windows=500)) == 100


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"path": "/does/not/exist"}, "does not exist"),
        ({"batch_size": 0}, "batch_size must be a positive"),
        ({"batch_size": -3}, "batch_size must be a positive"),
        ({"tokenizer": "wordpiece"}, "not one of: char, bpe"),
        ({"splits": [0.5, 0.5, 0.5]}, "summing to 1"),
    ],
)
def test_bad_input_is_explained(kwargs, match):
    with pytest.raises(UserError, match=match):
        dm(**kwargs).setup("fit")


def test_corpus_shorter_than_a_block(tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("too short")
    with pytest.raises(UserError, match="fewer than one block"):
        dm(path=str(f)).setup("fit")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(UserError, match="holds no text"):
        dm(path=str(empty)).setup("fit")
