"""Audio: the log-mel front end, the synthetic spoken digits, wav folders at several sample rates,
the Speech Commands layout, bad files, and short CLI runs of experiment=spoken_digits (its
synthetic digits and a folder of wav files) that must learn."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from bigmodel.data import AudioDataModule
from bigmodel.data.sources.audio_files import read_clip
from bigmodel.errors import UserError
from bigmodel.nets import AudioCNN, LogMel, SpecAugment
from bigmodel.nets.audio import hz_to_mel
from tests.conftest import logged, run_cli, run_dirs


def tone(freq: float, sr: int, seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    w = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([w] * channels, axis=1) if channels > 1 else w


def test_log_mel_puts_a_tone_in_its_mel_band():
    sr, n_mels, f_max = 16000, 40, 8000
    frontend = LogMel(sr, n_fft=512, hop_length=160, n_mels=n_mels, f_min=0.0, f_max=f_max)
    for freq in (300.0, 1000.0, 4000.0):
        mel = frontend(torch.from_numpy(tone(freq, sr, 0.5))[None])  # (1, n_mels, frames)
        assert mel.shape == (1, n_mels, 1 + 8000 // 160)
        peak = int(mel[0].mean(-1).argmax())
        # filter centres are evenly spaced in mel: the peak filter is the one nearest the tone
        centres = torch.linspace(0, float(hz_to_mel(f_max)), n_mels + 2)[1:-1]
        assert abs(peak - int((centres - float(hz_to_mel(freq))).abs().argmin())) <= 1
    with pytest.raises(ValueError, match="sample rate"):
        LogMel(8000, f_max=6000)


def test_spec_augment_masks_only_in_training():
    x = torch.ones(4, 20, 30)
    aug = SpecAugment(freq_mask=5, time_mask=6, num_masks=2)
    aug.eval()
    assert torch.equal(aug(x), x)
    aug.train()
    torch.manual_seed(0)
    y = aug(x)
    assert (y == 0).any() and (y == 1).any()
    for b in range(4):  # masks are whole rows (mel bins) and columns (frames)
        zero_rows = (y[b] == 0).all(dim=1).sum() + (y[b] == 0).all(dim=0).sum()
        assert zero_rows > 0 or (y[b] == 1).all()
    net = AudioCNN(num_classes=3, sample_rate=8000, n_mels=16, hop_length=160, widths=[8])
    assert net(torch.randn(2, 8000)).shape == (2, 3)


def test_spoken_digits_are_deterministic_and_cached(tmp_path):
    kw = dict(
        clips_per_class=5,
        num_speakers=4,
        cache_dir=str(tmp_path),
        val_fraction=0.2,
        test_fraction=0.2,
    )
    a = AudioDataModule(seed=5, **kw)
    a.setup()
    (cached,) = (tmp_path / "spoken_digits").glob("*.npz")
    b = AudioDataModule(seed=5, **kw)
    b.setup()
    c = AudioDataModule(seed=6, **{**kw, "cache_dir": None})
    c.setup()
    x_a = a.datasets["train"].tensors[0]
    assert x_a.shape[1] == 16000 and torch.equal(x_a, b.datasets["train"].tensors[0])
    assert not torch.equal(x_a, c.datasets["train"].tensors[0])
    assert [len(a.datasets[s]) for s in ("train", "val", "test")] == [30, 10, 10]
    assert a.classes[0] == "zero" and a.net_kwargs == {"num_classes": 10, "sample_rate": 16000}
    assert cached.stat().st_size > 0
    loud = x_a.abs().amax(dim=1)
    assert (loud > 0.2).all()  # every clip holds speech, not only noise


def write_wav_folder(root, rates=(8000, 16000, 44100), per_class=4, layout=None):
    """Label c is a tone of 300 * (c + 1) Hz; files named <label>_<speaker>_<n>.wav."""
    for c, label in enumerate(("low", "mid", "high")):
        d = root / (layout or "") / label
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            sr = rates[i % len(rates)]
            channels = 2 if i % 2 else 1
            sf.write(d / f"{label}_spk{i % 4}_{i}.wav", tone(300 * (c + 1), sr, 0.6, channels), sr)
    return root


def test_audio_folder_resamples_mixes_and_pads(tmp_path):
    write_wav_folder(tmp_path)
    dm = AudioDataModule(
        source="folder",
        root=str(tmp_path),
        sample_rate=16000,
        clip_seconds=1.0,
        val_fraction=0.25,
        test_fraction=0.25,
    )
    dm.setup()
    assert dm.classes == ["high", "low", "mid"]
    x, y = dm.datasets["train"].tensors
    assert x.shape[1] == 16000
    for wave, label in zip(x, y, strict=True):
        want = 300 * (["low", "mid", "high"].index(dm.classes[label]) + 1)
        spectrum = np.abs(np.fft.rfft(wave[:9600].numpy()))
        assert abs(np.argmax(spectrum) * 16000 / 9600 - want) < 5  # the tone survived resampling
        assert wave[9700:].abs().max() == 0  # 0.6 s clips padded with silence to 1 s
    w = read_clip(next(tmp_path.rglob("*.wav")), 16000, 4000)
    assert w.shape == (4000,) and w.dtype == np.float32


def test_audio_folder_is_decoded_once_then_memory_mapped_until_a_clip_changes(tmp_path):
    root, cache = write_wav_folder(tmp_path / "wavs"), tmp_path / "cache"

    def load(sample_rate=16000):
        kw = {"val_fraction": 0.25, "test_fraction": 0.25, "cache_dir": str(cache)}
        dm = AudioDataModule(source="folder", root=str(root), sample_rate=sample_rate, **kw)
        dm.setup()
        return dm

    def entries():
        return len(list((cache / "audio_folder").iterdir()))

    first = load()
    assert entries() == 3  # one a split
    second = load()
    assert entries() == 3
    for s in ("train", "val", "test"):
        for a, b in zip(first.datasets[s].tensors, second.datasets[s].tensors, strict=True):
            assert torch.equal(a, b)
    load(sample_rate=8000)  # another rate: decoded again
    assert entries() == 6
    clip = first.files["test"][0]
    sf.write(clip, tone(1000, 16000, 0.6, 1), 16000)  # one test clip changed
    changed = load()
    assert entries() == 7
    assert not torch.equal(changed.datasets["test"].tensors[0], first.datasets["test"].tensors[0])


def test_audio_folder_split_by_speaker(tmp_path):
    write_wav_folder(tmp_path, per_class=8)
    dm = AudioDataModule(
        source="folder",
        root=str(tmp_path),
        split_by="speaker",
        val_fraction=0.25,
        test_fraction=0.25,
    )
    dm.setup()
    speakers = {s: {f.stem.split("_")[1] for f in dm.files[s]} for s in ("train", "val", "test")}
    # 4 speakers: 2 train, 1 val, 1 test, and no speaker's clips land in two splits
    assert [len(speakers[s]) for s in ("train", "val", "test")] == [2, 1, 1]
    assert len(set.union(*speakers.values())) == 4
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [12, 6, 6]
    (tmp_path / "low" / "oddname.wav").write_bytes(
        (tmp_path / "low" / "low_spk0_0.wav").read_bytes()
    )
    with pytest.raises(UserError, match="<label>_<speaker>_<n>"):
        AudioDataModule(source="folder", root=str(tmp_path), split_by="speaker").setup()


def test_speech_commands_layout(tmp_path):
    words = ("yes", "no", "up")
    for w in words:
        (tmp_path / w).mkdir()
        for spk in range(5):
            sf.write(tmp_path / w / f"{spk:08x}_nohash_0.wav", tone(440, 16000, 1.0), 16000)
    (tmp_path / "_background_noise_").mkdir()
    sf.write(tmp_path / "_background_noise_" / "white.wav", tone(50, 16000, 2.0), 16000)
    (tmp_path / "validation_list.txt").write_text(
        "yes/00000000_nohash_0.wav\nno/00000001_nohash_0.wav\n"
    )
    (tmp_path / "testing_list.txt").write_text("up/00000002_nohash_0.wav\n")
    dm = AudioDataModule(source="speech_commands", root=str(tmp_path), preload=False)
    dm.setup()
    assert dm.classes == ["no", "up", "yes"]
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [12, 2, 1]
    x, y = dm.datasets["test"][0]
    assert x.shape == (16000,) and dm.classes[y] == "up"
    sub = AudioDataModule(source="speech_commands", root=str(tmp_path), classes=["yes", "no"])
    sub.setup()
    assert sub.classes == ["yes", "no"] and len(sub.datasets["test"]) == 0
    (tmp_path / "testing_list.txt").unlink()
    with pytest.raises(UserError, match="testing_list.txt"):
        AudioDataModule(source="speech_commands", root=str(tmp_path)).setup()


def test_audio_bad_input(tmp_path):
    write_wav_folder(tmp_path)
    bad = tmp_path / "low" / "low_spk9_9.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(UserError, match=r"low_spk9_9\.wav.*on_bad_file=skip"):
        AudioDataModule(source="folder", root=str(tmp_path)).setup()
    dm = AudioDataModule(
        source="folder",
        root=str(tmp_path),
        on_bad_file="skip",
        val_fraction=0.25,
        test_fraction=0.0,
    )
    dm.setup()
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 12
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"class folder .*empty holds no audio"):
        AudioDataModule(source="folder", root=str(tmp_path), on_bad_file="skip").setup()
    with pytest.raises(UserError, match="sample_rate"):
        AudioDataModule(sample_rate=100)
    with pytest.raises(UserError, match="clip_seconds"):
        AudioDataModule(clip_seconds=0.01)
    one = tmp_path / "one"
    write_wav_folder(one)
    for label in ("mid", "high"):
        for f in (one / label).iterdir():
            f.unlink()
        (one / label).rmdir()
    with pytest.raises(UserError, match="only one class"):
        AudioDataModule(source="folder", root=str(one)).setup()


@pytest.mark.slow  # ~35 s; the fast suite runs experiment=spoken_digits through the README test
def test_cli_spoken_digits(tmp_path):
    # The log-mel CNN sits near ln(10) for its first ~80 steps; 20 epochs of 14 steps at a higher
    # learning rate get well past that (about 25 s).
    run_cli(
        "train.py",
        "experiment=spoken_digits",
        "data.clips_per_class=60",
        "data.num_speakers=10",
        "data.batch_size=32",
        "trainer.max_epochs=20",
        "model.net.widths=[16,32]",
        "optimizer.lr=0.01",
        "trainer.log_every_n_steps=1",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    (run,) = run_dirs(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"test/acc", "test/acc_top5", "test/f1", "val/acc"} <= set(metrics)
    assert (run / "confusion_matrix.png").is_file()
    assert list((tmp_path / ".cache" / "spoken_digits").glob("*.npz"))
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["AudioDataModule"]["classes"][:2] == ["zero", "one"]
    losses = logged(run, "train/loss")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses  # from about 2.4 to 1.8
    # unseen speakers: chance is 1 in 10, this run reaches about 0.38
    assert metrics["test/acc"] > 0.1 + 0.15, metrics["test/acc"]


def test_cli_audio_folder_learns_the_tones(tmp_path):
    """The README's own-folder command on tones at three sample rates, mono and stereo."""
    write_wav_folder(tmp_path / "wavs", per_class=24)
    run_cli(
        "train.py",
        "experiment=spoken_digits",
        "data=audio_folder",
        f"data.root={tmp_path / 'wavs'}",
        "data.split_by=speaker",
        "data.val_fraction=0.25",
        "data.test_fraction=0.25",
        "data.batch_size=8",
        "trainer.max_epochs=20",
        "model.net.widths=[8,16]",
        "optimizer.lr=0.01",
        "trainer.log_every_n_steps=1",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    (run,) = run_dirs(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["AudioDataModule"]["classes"] == ["high", "low", "mid"]
    losses = logged(run, "train/loss")
    # the first epoch's batches against the last's (5 a epoch; the last one is partial, so one
    # batch alone is noisy): from about ln(3) = 1.1 to 0.6; a net that does not learn drifts by
    # up to 0.2 on 24 clips
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.4, losses
    assert metrics["test/acc"] > 1 / 3 + 0.3, metrics["test/acc"]  # three classes


def test_too_few_speakers_for_the_fractions_is_one_warning(trained):
    out = trained.proc("audio").stdout + trained.proc("audio").stderr  # 4 speakers
    line = (
        "[bigmodel][WARNING] - data.split_by=speaker: 4 speakers are fewer than "
        "data.val_fraction=0.1 and data.test_fraction=0.2 need (10 for one speaker each); val and "
        "test get 1 speaker each, 25% of the speakers; add speakers or use data.split_by=clip"
    )
    assert out.count(line) == 1


def test_a_folder_with_too_few_speakers_for_one_fraction_names_it(tmp_path):
    write_wav_folder(tmp_path / "wavs", per_class=8)  # speakers spk0 .. spk3
    proc = run_cli(
        "train.py",
        "experiment=spoken_digits",
        "data=audio_folder",
        f"data.root={tmp_path / 'wavs'}",
        "data.split_by=speaker",
        "data.val_fraction=0.1",  # 0.4 of a speaker: gets one, 25 %
        "data.test_fraction=0.3",  # 1.2 speakers: one, as asked within rounding
        "trainer.max_epochs=1",
        "model.net.widths=[8]",
        "test=false",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    warnings = [
        line[line.index("[bigmodel]") :]
        for line in proc.stdout.splitlines()
        if "[bigmodel]" in line and "split_by=speaker" in line
    ]
    assert warnings == [
        "[bigmodel][WARNING] - data.split_by=speaker: 4 speakers are fewer than "
        "data.val_fraction=0.1 needs (10 for one speaker); val gets 1 speaker, 25% of the "
        "speakers; add speakers or use data.split_by=clip"
    ], warnings
