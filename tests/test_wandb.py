"""Tracking: W&B offline runs read back from their .wandb files, MLflow and TensorBoard stores,
credentials kept out of everything a run writes, and W&B sweep configs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from tests.conftest import ROOT, TINY_LM, compose_config, run_cli, run_dirs

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # the shape of a W&B API key


def read_wandb(path: Path) -> list:
    """The records of a `.wandb` file, parsed with W&B's own protobuf schema.

    The file is W&B's transaction log: a 7-byte header (":W&B", magic, version), then 32 KiB
    blocks of chunks, each with a 7-byte header (crc32, length, type: full/first/middle/last),
    as in LevelDB's log format.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer too short for a header: padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
    return records


def of_kind(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def history(records: list) -> list[dict]:
    rows = []
    for h in of_kind(records, "history"):
        rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in h.item})
    return rows


def all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_wandb_offline_run_mlflow_tensorboard_and_no_leaked_key(tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY, "WANDB_DIR": str(tmp_path)}
    proc = run_cli(
        "train.py",
        "logger=[wandb,mlflow,tensorboard]",
        *TINY_LM,
        "tags=[tiny,tracking]",
        # a config that reads a key from the environment: trackers and checkpoints get it masked
        "+service.api_key=${oc.env:WANDB_API_KEY}",
        cwd=tmp_path,
        env=env,
    )
    (run,) = run_dirs(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())

    # W&B: offline, the sync command printed, the run id kept in the run directory
    run_id = (run / "wandb_id.txt").read_text().strip()
    (offline,) = (run / "wandb").glob(f"offline-run-*-{run_id}")
    assert f"wandb sync {run}/wandb/offline-run-*-{run_id}" in proc.stdout
    records = read_wandb(offline / f"run-{run_id}.wandb")
    (info,) = of_kind(records, "run")
    assert info.run_id == run_id
    assert info.display_name == run.name and info.run_group == "train"
    assert list(info.tags) == ["tiny", "tracking"]
    # the config as flat dotted keys
    config = {i.key: json.loads(i.value_json) for c in of_kind(records, "config") for i in c.update}
    assert config["model.net.n_embd"] == 32 and config["model.net.n_layer"] == 1
    assert config["optimizer._target_"] == "bigmodel.muon.MuonAdamW"
    assert config["trainer.max_steps"] == 12
    assert config["service.api_key"] == "***"
    # the logged metrics: the last validation loss is the run's
    rows = history(records)
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert len(val) == 2 and val[-1] == pytest.approx(metrics["val/loss"], rel=1e-6)
    assert any("train/loss" in r for r in rows) and any("test/ppl" in r for r in rows)

    # MLflow: a local store under logs/mlruns with the same metrics and the flat params
    mlruns = tmp_path / "logs" / "mlruns"
    (val_file,) = mlruns.glob("*/*/metrics/val/loss")
    assert float(val_file.read_text().split()[-2]) == pytest.approx(metrics["val/loss"], rel=1e-6)
    (param,) = mlruns.glob("*/*/params/model.net.n_embd")
    assert param.read_text() == "32"

    # TensorBoard: the event file holds the validation curve
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("val/loss")][-1] == pytest.approx(val[-1], rel=1e-6)

    # the key is nowhere: logs, config dumps, checkpoints, W&B, MLflow and TensorBoard files
    leaked = [p for p in all_files(tmp_path) if FAKE_KEY.encode() in p.read_bytes()]
    assert leaked == []
    assert FAKE_KEY not in proc.stdout + proc.stderr

    # resuming the run from its checkpoint continues the same W&B run
    run_cli(
        "train.py",
        "logger=wandb",
        *TINY_LM,
        "trainer.max_steps=18",
        f"ckpt_path={run}/checkpoints/last.ckpt",
        cwd=tmp_path,
        env=env,
    )
    (_, resumed) = run_dirs(tmp_path)
    assert (resumed / "wandb_id.txt").read_text().strip() == run_id
    (offline2,) = (resumed / "wandb").glob(f"offline-run-*-{run_id}")
    (info2,) = of_kind(read_wandb(offline2 / f"run-{run_id}.wandb"), "run")
    assert info2.run_id == run_id


@pytest.mark.slow
def test_wandb_group_and_name_in_a_sweep(tmp_path):
    """Trials of a sweep are grouped by the study and named after their trial."""
    run_cli(
        "train.py",
        "-m",
        "hparams_search=gpt_optuna",
        "logger=wandb",
        "model.net.n_layer=1",
        "model.net.n_head=2",
        "model.net.n_embd=32",
        "model.net.block_size=32",
        "data.batch_size=8",
        "data.max_eval_windows=8",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "scheduler.scheduler.warmup_steps=2",
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.study_name=grouped",
        cwd=tmp_path,
        env={"WANDB_MODE": "offline"},
    )
    trial = tmp_path / "logs" / "train" / "multiruns" / "grouped" / "0"
    run_id = (trial / "wandb_id.txt").read_text().strip()
    (offline,) = (trial / "wandb").glob(f"offline-run-*-{run_id}")
    (info,) = of_kind(read_wandb(offline / f"run-{run_id}.wandb"), "run")
    assert info.run_group == "grouped" and info.display_name == "grouped-0"
    assert list(info.tags) == ["sweep", "gpt_optuna"]


SWEEPS = sorted((ROOT / "wandb_sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_wandb_sweep_config_is_valid_and_its_command_composes(path, tmp_path):
    import sweeps
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    assert path.read_text().startswith("# wandb sweep wandb_sweeps/")
    spec = yaml.safe_load(path.read_text())
    # W&B's own sweep engine: the schema it validates against, and a run it would propose
    assert sweeps.schema_violations_from_proposed_config(spec) == []
    proposed = sweeps.next_run(spec, [], validate=True)
    args = create_sweep_command_args({"args": proposed.config})["args_no_hyphens"]

    command = spec["command"]
    assert command[:3] == ["${env}", "python", "${program}"] and command[-1] == "${args_no_hyphens}"
    assert (ROOT / spec["program"]).is_file()
    overrides = [*command[3:-1], *args]
    cfg = compose_config("train", overrides, tmp_path)
    for key, value in proposed.config.items():
        assert OmegaConf.select(cfg, key) == pytest.approx(value["value"]), key
    # the metric W&B optimises is the one the run reports
    assert spec["metric"]["name"] == cfg.optimized_metric
    assert "wandb" in cfg.logger
