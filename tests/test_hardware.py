"""precision=auto: bf16-mixed only where this machine has bf16 instructions, else 32-true."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml

from bigmodel.hardware import cpu_bf16_instructions, resolve_precision
from tests.conftest import TINY_LM, run_cli, run_dirs

PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")


def _cpu(monkeypatch, amx: bool, avx512_bf16: bool) -> None:
    """Another CPU than this one: the two instruction probes torch answers from cpuinfo."""
    monkeypatch.setattr(torch.cpu, PROBES[0], lambda: amx)
    monkeypatch.setattr(torch.cpu, PROBES[1], lambda: avx512_bf16)


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "chosen"),
    [(True, False, "bf16-mixed"), (False, True, "bf16-mixed"), (False, False, "32-true")],
)
def test_auto_picks_bf16_mixed_only_on_a_cpu_with_bf16_instructions(
    monkeypatch, amx, avx512_bf16, chosen
):
    _cpu(monkeypatch, amx, avx512_bf16)
    assert resolve_precision("auto", "cpu") == chosen
    assert resolve_precision("32-true", "cpu") == "32-true"  # what the user set stays


def test_explicit_bf16_on_a_cpu_without_it_is_kept_with_one_warning(monkeypatch, caplog):
    _cpu(monkeypatch, False, False)
    with caplog.at_level(logging.WARNING, logger="bigmodel"):
        assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    (record,) = caplog.records
    assert "emulated" in record.message and "precision=32-true or precision=auto" in record.message
    caplog.clear()
    _cpu(monkeypatch, True, False)
    with caplog.at_level(logging.WARNING, logger="bigmodel"):
        resolve_precision("bf16-mixed", "cpu")
    assert not caplog.records


def test_the_cli_runs_auto_as_this_cpu_allows_and_records_the_pick(tmp_path):
    """The user's command: the line says what was picked and why; the logged hparams hold it."""
    proc = run_cli("train.py", *TINY_LM, "precision=auto", "test=false", cwd=tmp_path)
    chosen = "bf16-mixed" if cpu_bf16_instructions() else "32-true"
    out = proc.stdout + proc.stderr
    assert f"precision=auto: {chosen} (this CPU has " in out
    (run,) = run_dirs(tmp_path)
    hparams = yaml.safe_load((run / "csv" / "hparams.yaml").read_text())
    assert hparams["trainer.precision"] == chosen
    assert hparams["precision"] == chosen
