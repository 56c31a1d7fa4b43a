"""Image data sources on fixtures the tests write: folders of PNG/JPEG, IDX files, CIFAR pickles."""

from __future__ import annotations

import gzip
import json
import logging
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from bigmodel.data import ImageDataModule
from bigmodel.data.image import random_crop, random_hflip
from bigmodel.data.sources.files import split_indices
from bigmodel.errors import UserError
from tests.conftest import logged, run_cli, run_dirs


def write_image_folder(
    root, classes=("cat", "dog", "eel"), per_class=12, splits=("train",), seed=0
):
    """Class c is a bright square at a class-specific corner; sizes, formats and modes vary."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                size = int(rng.integers(20, 48))
                a = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
                h = size // 2
                y0, x0 = [(0, 0), (0, h), (h, 0)][c % 3]
                a[y0 : y0 + h, x0 : x0 + h] = 230
                im = Image.fromarray(a)
                if i % 3 == 0:
                    im.save(d / f"{i}.jpg", quality=95)
                elif i % 3 == 1:
                    im.convert("L").save(d / f"{i}.png")
                else:
                    im.save(d / f"{i}.jpeg")
    return root


def test_digits_split_is_stratified_and_seeded():
    a, b = ImageDataModule(source="digits", seed=3), ImageDataModule(source="digits", seed=3)
    a.setup()
    b.setup()
    assert sum(len(a.data[s][1]) for s in ("train", "val", "test")) == 1797
    assert torch.equal(a.data["test"][0], b.data["test"][0])
    counts = torch.bincount(a.data["test"][1], minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # 20 % of each class (~180 per class)
    assert a.net_kwargs == {"num_classes": 10, "in_channels": 1, "image_size": 8}
    assert a.data["train"][0].dtype == torch.uint8 and a.data["train"][0].max() == 255
    parts = split_indices(np.repeat(np.arange(3), 10), [0.2, 0.3], seed=0)
    assert [len(p) for p in parts] == [15, 6, 9]
    assert len(np.unique(np.concatenate(parts))) == 30


def test_image_folder_with_seeded_split(tmp_path):
    write_image_folder(tmp_path)
    dm = ImageDataModule(
        source="folder", root=str(tmp_path), image_size=16, val_fraction=0.25, test_fraction=0.25
    )
    dm.setup()
    assert dm.classes == ["cat", "dog", "eel"]
    assert dm.channels == 3  # the JPEGs are RGB
    assert dm.data["train"][0].shape[1:] == (3, 16, 16)
    assert [len(dm.data[s][1]) for s in ("train", "val", "test")] == [18, 9, 9]
    # the class signal survives decoding and resizing: the bright quadrant is where it was put
    x, y = dm.data["train"]
    cat = x[y == 0].float().mean(0)[0]
    assert cat[:8, :8].mean() > cat[8:, 8:].mean() + 50


def test_image_folder_is_decoded_once_then_memory_mapped_until_a_file_changes(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    cache = tmp_path / "cache"

    def load(image_size=16):
        dm = ImageDataModule(
            source="folder",
            root=str(root),
            image_size=image_size,
            val_fraction=0.25,
            test_fraction=0.25,
            cache_dir=str(cache),
        )
        dm.setup()
        return dm

    def entries():
        return sorted(p.name for p in (cache / "image_folder").iterdir())

    first = load()
    assert len(entries()) == 1 and "decoded earlier" not in caplog.text
    second = load()
    assert "decoded earlier, memory-mapped" in caplog.text and len(entries()) == 1
    for s in ("train", "val", "test"):
        assert torch.equal(first.data[s][0], second.data[s][0])
        assert torch.equal(first.data[s][1], second.data[s][1])
    assert second.channels == first.channels == 3 and second.classes == first.classes
    load(image_size=12)  # another size: decoded again
    assert len(entries()) == 2
    img = next(root.rglob("*.png"))
    Image.new("L", (20, 20), 255).save(img)  # a file changed: decoded again
    changed = load()
    assert len(entries()) == 3
    assert any(not torch.equal(changed.data[s][0], first.data[s][0]) for s in first.data)


def test_image_folder_train_val_test_layout_and_grayscale(tmp_path):
    write_image_folder(tmp_path, classes=("a", "b"), per_class=4, splits=("train", "val", "test"))
    for f in tmp_path.rglob("*.jp*g"):
        f.unlink()  # PNGs only: all grayscale
    dm = ImageDataModule(source="folder", root=str(tmp_path), image_size=12)
    dm.setup()
    assert dm.channels == 1
    assert [len(dm.data[s][1]) for s in ("train", "val", "test")] == [2, 2, 2]
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch[0].dtype == torch.float32 and batch[0].shape[1:] == (1, 12, 12)


def test_image_folder_bad_input(tmp_path):
    write_image_folder(tmp_path, classes=("a", "b"), per_class=3)
    (tmp_path / "train" / "c").mkdir()
    with pytest.raises(UserError, match=r"class folder .*train/c holds no images"):
        ImageDataModule(source="folder", root=str(tmp_path), image_size=8).setup()
    (tmp_path / "train" / "c").rmdir()
    bad = tmp_path / "train" / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(UserError, match=r"broken\.png.*data\.on_bad_file=skip"):
        ImageDataModule(source="folder", root=str(tmp_path), image_size=8).setup()
    dm = ImageDataModule(
        source="folder",
        root=str(tmp_path),
        image_size=8,
        on_bad_file="skip",
        val_fraction=0.34,
        test_fraction=0.0,
    )
    dm.setup()
    assert sum(len(dm.data[s][1]) for s in ("train", "val")) == 6
    bad.unlink()
    for f in (tmp_path / "train" / "b").iterdir():
        f.unlink()
    (tmp_path / "train" / "b").rmdir()
    with pytest.raises(UserError, match="only one class"):
        ImageDataModule(source="folder", root=str(tmp_path), image_size=8).setup()
    with pytest.raises(UserError, match="image_size"):
        ImageDataModule(source="folder", root=str(tmp_path), image_size=0)


def write_idx(path, arr, gz):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    sets = {"train": 50, "t10k": 20}
    want = {}
    for prefix, n in sets.items():
        imgs = rng.integers(0, 256, (n, 28, 28))
        labels = np.arange(n) % 10
        suffix = ".gz" if gz else ""
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", imgs, gz)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
        want[prefix] = (imgs, labels)
    dm = ImageDataModule(source="mnist", root=str(tmp_path), val_fraction=0.2, test_fraction=0.0)
    dm.setup()
    assert np.array_equal(dm.data["test"][0][:, 0].numpy(), want["t10k"][0])
    assert np.array_equal(dm.data["test"][1].numpy(), want["t10k"][1])
    assert len(dm.data["train"][1]) + len(dm.data["val"][1]) == 50
    assert dm.net_kwargs == {"num_classes": 10, "in_channels": 1, "image_size": 28}


def test_mnist_missing_or_corrupt_files_say_what_to_do(tmp_path):
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte.*put the four standard"):
        ImageDataModule(source="mnist", root=str(tmp_path)).setup()
    for prefix in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            (tmp_path / f"{prefix}-{kind}-ubyte").write_bytes(b"\x00\x00\x0d\x01garbage")
    with pytest.raises(UserError, match="cannot read the IDX file"):
        ImageDataModule(source="mnist", root=str(tmp_path)).setup()


def test_cifar10_pickles(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {
            b"data": rng.integers(0, 256, (20, 3072)).astype(np.uint8),
            b"labels": list(rng.integers(0, 10, 20)),
            b"batch_label": name.encode(),
        }
        (base / name).write_bytes(pickle.dumps(d))
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    (base / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    dm = ImageDataModule(
        source="cifar10", root=str(tmp_path), val_fraction=0.1, test_fraction=0.0, image_size=16
    )
    dm.setup()
    assert dm.classes[0] == "airplane" and dm.classes[-1] == "truck"
    assert len(dm.data["test"][1]) == 20
    assert dm.data["train"][0].shape[1:] == (3, 16, 16)  # resized from 32
    # a pickle that would run code is refused
    (base / "test_batch").write_bytes(pickle.dumps({b"data": print}))
    with pytest.raises(UserError, match="refusing to load"):
        ImageDataModule(source="cifar10", root=str(tmp_path)).setup()
    (base / "test_batch").unlink()
    with pytest.raises(UserError, match=r"test_batch not found.*extract"):
        ImageDataModule(source="cifar10", root=str(tmp_path)).setup()


def test_augmentation_ops():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    assert torch.equal(random_crop(x, 0), x)
    g = torch.Generator().manual_seed(0)
    y = random_crop(x, 1, generator=g)
    assert y.shape == x.shape
    for i in range(2):  # every crop is the image shifted by at most one pixel, zero-filled
        padded = torch.nn.functional.pad(x[i], (1, 1, 1, 1))
        shifts = [padded[:, a : a + 4, b : b + 4] for a in range(3) for b in range(3)]
        assert any(torch.equal(y[i], s) for s in shifts)
    f = random_hflip(x, generator=torch.Generator().manual_seed(1))
    for i in range(2):
        assert torch.equal(f[i], x[i]) or torch.equal(f[i], x[i].flip(-1))


def test_cli_image_folder_trains_and_rejects_bad_data(tmp_path):
    write_image_folder(tmp_path / "imgs", per_class=20)
    # 10 epochs of 6 small batches at a higher learning rate: the corner squares are learned
    run_cli(
        "train.py",
        "data=image_folder",
        f"data.root={tmp_path / 'imgs'}",
        "data.image_size=16",
        "data.batch_size=8",
        "model=cnn",
        "model.net.widths=[8,16]",
        "loss=cross_entropy",
        "optimizer.lr=0.01",
        "scheduler=none",
        "trainer.max_steps=-1",
        "trainer.max_epochs=10",
        "trainer.val_check_interval=1.0",
        "trainer.check_val_every_n_epoch=1",
        "trainer.log_every_n_steps=2",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    (run,) = run_dirs(tmp_path)
    assert (run / "confusion_matrix.png").is_file()
    losses = logged(run, "train/loss")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses  # from about ln(3) = 1.1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/acc"] > 1 / 3 + 0.4, metrics["test/acc"]  # three classes
    (tmp_path / "imgs" / "train" / "cat" / "bad.jpg").write_bytes(b"\xff\xd8\xffjunk")
    proc = run_cli(
        "train.py",
        "data=image_folder",
        f"data.root={tmp_path / 'imgs'}",
        "model=cnn",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert "bad.jpg" in proc.stderr and "Traceback" not in proc.stderr
