"""Transfer learning: `model.init_from=CKPT` starts a model from a train.py checkpoint of the
same family; a head of another size is re-initialised (and said so), anything else that does not
fit is one clear line."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_LM, run_cli, run_dirs
from tests.test_image import write_image_folder

CNN = ["model.net.widths=[8,16]", "trainer.max_epochs=1", "data.batch_size=64"]
# the image folder's images, read as grayscale like the digits
FOLDER = ["data=image_folder", "data.channels=1", "data.image_size=16", "data.batch_size=8"]


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    run_cli("train.py", "experiment=digits_cnn", *CNN, "test=false", cwd=root)
    (run,) = run_dirs(root)
    return run / "checkpoints" / "last.ckpt"


@pytest.mark.slow  # two CNN training runs
def test_cnn_trained_on_digits_fine_tunes_on_an_image_folder(tmp_path, digits_ckpt):
    images = write_image_folder(tmp_path / "imgs", per_class=6)
    # the widths are the checkpoint's without being given again
    run_cli(
        "train.py",
        "experiment=digits_cnn",
        *CNN[1:],
        *FOLDER,
        f"data.root={images}",
        f"model.init_from={digits_ckpt}",
        "trainer.max_epochs=2",
        cwd=tmp_path,
    )
    (run,) = run_dirs(tmp_path)
    log = (run / "train.log").read_text()
    assert (
        "model.init_from: head.fc.weight is re-initialised (num_classes 10 in the checkpoint, 3 "
        "here: shape (10, 16) -> (3, 16))" in log
    )
    assert "head.fc.bias is re-initialised" in log
    assert f"model.init_from: model.net as in {digits_ckpt}: widths=[8, 16]" in log
    # every other weight started from the digits model: the first conv moved little from it
    digits = torch.load(digits_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    tuned = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    tuned = tuned["state_dict"]
    stem = next(k for k in digits if k.endswith(".weight") and digits[k].ndim == 4)
    fresh = torch.nn.init.kaiming_normal_(torch.empty_like(digits[stem]))
    moved = (tuned[stem] - digits[stem]).norm()
    assert moved < 0.5 * (fresh - digits[stem]).norm()
    assert tuned["net.head.fc.weight"].shape == (3, 16)
    # eval.py scores the fine-tuned checkpoint on its own (image folder) data
    out = run_cli("eval.py", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", cwd=tmp_path)
    assert "test/acc" in out.stdout


@pytest.mark.slow  # a CNN training run first
@pytest.mark.parametrize(
    ("args", "says"),
    [
        # three input channels where the digits had one: not a head
        (
            ["data.channels=3"],
            "does not fit this model: body.stem.0.weight is (8, 1, 3, 3) there and (8, 3, 3, 3) "
            "here; only a head sized by num_classes or out_features is re-initialised",
        ),
        (["model.net.widths=[8,32]"], "does not fit this model"),
        (
            ["model=vit"],
            "is a bigmodel.nets.CNN (bigmodel.tasks.Classifier), but this run builds a "
            "bigmodel.nets.ViT (bigmodel.tasks.Classifier); start from a checkpoint of the same "
            "model= family",
        ),
    ],
    ids=["channels", "width", "family"],
)
def test_what_does_not_fit_is_refused(tmp_path, digits_ckpt, args, says):
    images = write_image_folder(tmp_path / "imgs", per_class=6)
    cnn = CNN if "model=vit" not in args else CNN[1:]
    argv = [
        "experiment=digits_cnn",
        *cnn,
        *FOLDER,
        f"data.root={images}",
        f"model.init_from={digits_ckpt}",
    ]
    proc = run_cli("train.py", *argv, *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert says in line, line
    assert "Traceback" not in proc.stderr


def test_a_char_gpt_continues_on_another_text_with_its_own_vocabulary(tmp_path):
    """A language model keeps the checkpoint's tokenizer: ids mean what they meant."""
    first = tmp_path / "first"
    first.mkdir()
    run_cli("train.py", *TINY_LM, "test=false", cwd=first)
    (run,) = run_dirs(first)
    ckpt = run / "checkpoints" / "last.ckpt"
    text = tmp_path / "other.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    second = tmp_path / "second"
    second.mkdir()
    run_cli("train.py", *TINY_LM, f"model.init_from={ckpt}", f"data.path={text}", cwd=second)
    (run2,) = run_dirs(second)
    assert f"model.init_from: 11 tensors from {ckpt}" in (run2 / "train.log").read_text()
    a = torch.load(ckpt, weights_only=True)["TextDataModule"]["tokenizer"]
    b = torch.load(run2 / "checkpoints" / "last.ckpt", weights_only=True)["TextDataModule"][
        "tokenizer"
    ]
    assert a == b
