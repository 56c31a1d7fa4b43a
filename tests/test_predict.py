"""predict.py on files: class folders of images (accuracy against the labels), prompts, sentences,
rows of numbers; from a checkpoint and from an exported folder; unreadable files; atomic output."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from tests.test_export import export, net_from_checkpoint


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def best_checkpoint(run: Path) -> Path:
    return next((run / "checkpoints").glob("best_*.ckpt"))


def write_test_split_pngs(ckpt: Path, folder: Path) -> int:
    """The checkpoint's own test images as PNG files in class folders -> how many."""
    from PIL import Image

    from bigmodel.checkpoints import restore

    _, dm, _ = restore(str(ckpt))
    dm.setup("test")
    x, y = dm.data["test"]  # uint8 (N, 1, 8, 8), (N,)
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        path = folder / dm.classes[int(label)] / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(path)
    return len(y)


def predict(*args: str, cwd: Path, check: bool = True):
    return run_cli("predict.py", "progress=false", *args, cwd=cwd, check=check)


def test_digits_folder_accuracy_is_the_test_accuracy(trained, tmp_path):
    run = trained("cnn")
    ckpt = best_checkpoint(run)  # the one train.py tested
    n = write_test_split_pngs(ckpt, tmp_path / "digits")
    (tmp_path / "digits" / "3" / "broken.png").write_bytes(b"\x89PNG not really")

    # unreadable file, on_bad_file=error (the default): stop, naming it, and write nothing
    proc = predict(f"ckpt_path={ckpt}", "input=digits", "output=p.csv", cwd=tmp_path, check=False)
    assert (
        proc.returncode == 2 and "broken.png" in proc.stderr and "on_bad_file=skip" in proc.stderr
    )
    assert not (tmp_path / "p.csv").exists()

    proc = predict(
        f"ckpt_path={ckpt}", "input=digits", "output=p.csv", "on_bad_file=skip", cwd=tmp_path
    )
    assert "skipped" in proc.stderr and "broken.png" in proc.stderr
    rows = read_csv(tmp_path / "p.csv")
    assert len(rows) == n
    right = sum(r["label"] == r["target"] for r in rows)
    # the same images and preprocessing as the test split: the accuracy train.py reported
    test_acc = json.loads((run / "metrics.json").read_text())["test/acc"]
    assert right / n == pytest.approx(test_acc, abs=1e-6), (right / n, test_acc)
    assert f"accuracy {right / n:.4f} on {n} files" in proc.stdout
    probs = np.array([[float(r[f"p_{k}"]) for k in range(10)] for r in rows])
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert [str(int(p.argmax())) for p in probs] == [r["label"] for r in rows]

    # an existing output is kept unless overwrite=true
    before = (tmp_path / "p.csv").read_text()
    proc = predict(f"ckpt_path={ckpt}", "input=digits", "output=p.csv", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "overwrite=true" in proc.stderr
    assert (tmp_path / "p.csv").read_text() == before


@pytest.mark.slow  # an export and a second prediction: ~15 s
def test_the_onnx_folder_predicts_as_the_checkpoint(trained, tmp_path):
    ckpt = best_checkpoint(trained("cnn"))
    write_test_split_pngs(ckpt, tmp_path / "digits")
    predict(f"ckpt_path={ckpt}", "input=digits", "output=p.csv", cwd=tmp_path)
    rows = read_csv(tmp_path / "p.csv")
    probs = np.array([[float(r[f"p_{k}"]) for k in range(10)] for r in rows])
    # the exported ONNX folder gives the same labels, and probabilities within 1e-4
    export(ckpt, tmp_path / "onnx", "format=onnx")
    predict("model_dir=onnx", "input=digits", "output=o.jsonl", cwd=tmp_path)
    onnx_rows = read_jsonl(tmp_path / "o.jsonl")
    assert [r["label"] for r in onnx_rows] == [r["label"] for r in rows]
    onnx_probs = np.array([list(r["probs"].values()) for r in onnx_rows])
    assert np.abs(onnx_probs - probs).max() < 1e-4


@pytest.mark.slow
def test_a_list_of_image_paths(trained, tmp_path):
    ckpt = best_checkpoint(trained("cnn"))
    write_test_split_pngs(ckpt, tmp_path / "digits")
    files = sorted((tmp_path / "digits").rglob("*.png"))[:5]
    (tmp_path / "list.txt").write_text("\n".join(str(f.relative_to(tmp_path)) for f in files))
    predict(f"ckpt_path={ckpt}", "input=list.txt", "output=l.jsonl", cwd=tmp_path)
    rows = read_jsonl(tmp_path / "l.jsonl")
    assert [Path(r["path"]).name for r in rows] == [f.name for f in files]


@pytest.mark.slow
def test_prompts_give_the_generations_of_generate_py(trained, tmp_path):
    run = trained("gpt")
    ckpt = run / "checkpoints" / "last.ckpt"
    prompts = ["The ", "It was"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    greedy = ["max_new_tokens=24", "temperature=0"]
    predict(f"ckpt_path={ckpt}", "input=prompts.txt", "output=g.jsonl", *greedy, cwd=tmp_path)
    rows = read_jsonl(tmp_path / "g.jsonl")
    assert [r["prompt"] for r in rows] == prompts
    # greedy decoding is deterministic: generate.py's own text (the reference), to the character
    for r in rows:
        ref = run_cli(
            "generate.py", f"ckpt_path={ckpt}", f"prompt={r['prompt']}", *greedy, cwd=tmp_path
        )
        assert r["text"] == ref.stdout.rstrip("\n")
        assert len(r["text"]) == len(r["prompt"]) + 24  # char tokenizer: a character a token
    # the ONNX graph samples the same tokens
    export(ckpt, tmp_path / "gpt_onnx", "format=onnx")
    predict("model_dir=gpt_onnx", "input=prompts.txt", "output=o.csv", *greedy, cwd=tmp_path)
    onnx_rows = read_csv(tmp_path / "o.csv")
    assert [r["text"] for r in onnx_rows] == [r["text"] for r in rows]


@pytest.mark.slow
def test_rows_of_numbers_give_the_regression_outputs(trained, tmp_path):
    run = trained("mlp")
    ckpt = run / "checkpoints" / "last.ckpt"
    net, _, _ = net_from_checkpoint(ckpt)
    x = torch.randn(7, 10, generator=torch.Generator().manual_seed(0))
    lines = ["a,b,c,d,e,f,g,h,i,j"] + [",".join(f"{v:.6f}" for v in row) for row in x.tolist()]
    lines.insert(3, "1,2,three")  # an unreadable row
    (tmp_path / "x.csv").write_text("\n".join(lines) + "\n")
    predict(f"ckpt_path={ckpt}", "input=x.csv", "output=y.csv", "on_bad_file=skip", cwd=tmp_path)
    rows = read_csv(tmp_path / "y.csv")
    assert len(rows) == 7
    y = np.array([[float(r[f"y{i}"]) for i in range(10)] for r in rows])
    assert [int(r["line"]) for r in rows] == [2, 3, 5, 6, 7, 8, 9]  # line numbers of the file
    written = torch.tensor([[float(f"{v:.6f}") for v in row] for row in x.tolist()])
    with torch.no_grad():
        ref = net(written).numpy()
    assert np.abs(y - ref).max() < 1e-5


@pytest.mark.slow
def test_sentences_give_the_translations_of_generate_py(trained, tmp_path):
    run = trained("seq2seq")
    ckpt = run / "checkpoints" / "last.ckpt"
    sentences = ["She buys a red apple.", "The two cups are on the table."]
    (tmp_path / "src.txt").write_text("\n".join(sentences) + "\n")
    predict(f"ckpt_path={ckpt}", "input=src.txt", "output=t.jsonl", "beam_size=1", cwd=tmp_path)
    rows = read_jsonl(tmp_path / "t.jsonl")
    ref = run_cli(
        "generate.py",
        f"ckpt_path={ckpt}",
        f"text={json.dumps(sentences)}",
        "beam_size=1",
        cwd=tmp_path,
    )
    assert all(r["translation"] for r in rows)  # trained far enough to say something
    assert [r["translation"] for r in rows] == ref.stdout.rstrip("\n").split("\n")
    # the ONNX encoder and decoder step decode greedily to the same text
    export(ckpt, tmp_path / "mt", "format=onnx")
    predict("model_dir=mt", "input=src.txt", "output=o.jsonl", cwd=tmp_path)
    onnx_rows = read_jsonl(tmp_path / "o.jsonl")
    assert [r["translation"] for r in onnx_rows] == [r["translation"] for r in rows]


@pytest.mark.slow
def test_audio_files_from_a_folder(trained, tmp_path):
    import soundfile as sf

    from bigmodel.checkpoints import restore

    ckpt = trained("audio") / "checkpoints" / "last.ckpt"
    _, dm, task = restore(str(ckpt))
    dm.setup("test")
    waves, labels = dm.dataset("test").tensors
    for i in range(8):
        path = tmp_path / "clips" / dm.classes[int(labels[i])] / f"{i}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, waves[i].numpy(), 16000, subtype="FLOAT")
    predict(f"ckpt_path={ckpt}", "input=clips", "output=a.jsonl", cwd=tmp_path)
    rows = read_jsonl(tmp_path / "a.jsonl")
    with torch.no_grad():
        ref = task.net.eval()(waves[:8]).argmax(-1)
    by_name = {Path(r["path"]).stem: r["label"] for r in rows}
    assert [by_name[str(i)] for i in range(8)] == [dm.classes[int(k)] for k in ref]


def test_blank_prompt_lines_are_skipped_and_counted(trained, tmp_path):
    ckpt = trained("gpt") / "checkpoints" / "last.ckpt"
    (tmp_path / "prompts.txt").write_text("The \n\n   \nIt was\n\n")
    proc = predict(
        f"ckpt_path={ckpt}", "input=prompts.txt", "output=g.jsonl", "max_new_tokens=4", cwd=tmp_path
    )
    assert [r["prompt"] for r in read_jsonl(tmp_path / "g.jsonl")] == ["The ", "It was"]
    assert "wrote 2 predictions to g.jsonl; skipped 3 blank lines" in proc.stdout


def test_blank_lines_of_a_list_of_image_paths_are_counted(trained, tmp_path):
    """Every line-based input says what it skipped: here a .txt list of files."""
    ckpt = best_checkpoint(trained("cnn"))
    write_test_split_pngs(ckpt, tmp_path / "digits")
    files = sorted((tmp_path / "digits").rglob("*.png"))[:3]
    (tmp_path / "list.txt").write_text("\n" + "\n\n".join(str(f) for f in files) + "\n")
    proc = predict(f"ckpt_path={ckpt}", "input=list.txt", "output=p.csv", cwd=tmp_path)
    assert len(read_csv(tmp_path / "p.csv")) == 3
    assert "wrote 3 predictions to p.csv; skipped 3 blank lines" in proc.stdout
