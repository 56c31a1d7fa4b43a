"""Every config file in configs/ is composed by Hydra and what it describes is instantiated."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from bigmodel.run import build_task, instantiate_all
from tests.conftest import CONFIGS, compose_config

# Values a DataModule would supply for `???` net fields, so nets build without loading data.
NET_FIELDS = {
    "vocab_size": 64,
    "num_classes": 10,
    "in_channels": 1,
    "image_size": 8,
    "src_vocab_size": 64,
    "tgt_vocab_size": 64,
    "in_features": 10,
    "out_features": 10,
    "n_mels": 32,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "sample_rate": 16000,
}
# The data a model or loss option is used with (the text default fits only language models).
PAIRED = {
    ("model", "cnn"): ["data=digits"],
    ("model", "vit"): ["data=digits"],
    ("model", "audio_cnn"): ["data=spoken_digits"],
    ("model", "mlp"): ["data=regression"],
    ("model", "seq2seq"): ["data=translation"],
    ("loss", "cross_entropy"): ["model=cnn", "data=digits"],
    ("loss", "hinge"): ["model=cnn", "data=digits"],
    ("loss", "mse"): ["model=mlp", "data=regression"],
    ("loss", "l1"): ["model=mlp", "data=regression"],
    ("loss", "huber"): ["model=mlp", "data=regression"],
}
# Groups whose options are composed through `hydra` (sweepers, launchers), not the job config.
HYDRA_GROUPS = {"hparams_search", "launcher", "hydra"}
# Folders under configs/ that are not Hydra groups of train.yaml (W&B sweep specs).
NOT_GROUPS = {"wandb_sweep"}


def group_options() -> list[tuple[str, str]]:
    out = []
    for f in sorted(CONFIGS.rglob("*.yaml")):
        rel = f.relative_to(CONFIGS)
        if len(rel.parts) == 1 or rel.parts[0] in NOT_GROUPS:
            continue
        out.append(("/".join(rel.parts[:-1]), rel.stem))
    return out


class FakeData:
    """Stands in for a DataModule's `net_kwargs` only (data loading is tested per modality)."""

    net_kwargs = NET_FIELDS


def fill_missing(node: DictConfig) -> None:
    with open_dict(node):
        for key in list(node.keys()):
            if OmegaConf.is_missing(node, key):
                node[key] = NET_FIELDS.get(key, 8)


def instantiate_job(cfg: DictConfig, group: str) -> None:
    """Build what the composed config describes, as the runner would, without training."""
    hydra.utils.instantiate(cfg.data)
    fill_missing(cfg.model.net)
    task = build_task(cfg, FakeData())
    assert isinstance(task, torch.nn.Module)
    if cfg.get("optimizer") and "deepspeed" in str(cfg.optimizer.get("_target_", "")):
        # DeepSpeed's CPU Adam JIT-compiles its kernel on first use (about 80 s): the offload
        # strategies' own tests build it; here it is resolved, not called.
        hydra.utils.instantiate(cfg.optimizer)
    elif cfg.get("optimizer"):
        opt = hydra.utils.instantiate(cfg.optimizer)(task.parameters())
        if cfg.get("scheduler"):
            sched = hydra.utils.instantiate(cfg.scheduler, _convert_="partial")
            factory = sched["scheduler"]
            # `total_steps: null` is filled by the task from the trainer; give it one here.
            kwargs = {"total_steps": 1000} if factory.keywords.get("total_steps", 0) is None else {}
            assert isinstance(factory(opt, **kwargs), torch.optim.lr_scheduler.LRScheduler)
    instantiate_all(cfg.get("callbacks"))
    instantiate_all(cfg.get("logger"))
    strategy = cfg.get("strategy")
    if isinstance(strategy, DictConfig):
        if "deepspeed" in str(strategy.get("_target_", "")).lower():
            pytest.importorskip("deepspeed")
        hydra.utils.instantiate(strategy)
    if group not in ("strategy",):
        # Accelerator-specific trainers (gpu, ddp) are checked for their keys on the CPU here.
        hydra.utils.instantiate(
            cfg.trainer, accelerator="cpu", devices=1, strategy="auto", logger=False
        )


@pytest.mark.parametrize(("group", "option"), group_options(), ids=lambda v: v)
def test_config_composes_and_instantiates(group: str, option: str, tmp_path: Path) -> None:
    if group in HYDRA_GROUPS:
        overrides = [f"{group}={option}"] if group != "hydra" else []
        cfg = compose_config("train", overrides, tmp_path, hydra=True)
        assert cfg is not None
        return
    overrides = [] if group == "local" else [f"{group}={option}", *PAIRED.get((group, option), [])]
    cfg = compose_config("train", overrides, tmp_path)
    if group == "logger" and option == "mlflow":
        pytest.importorskip("mlflow")
    instantiate_job(cfg, group)


@pytest.mark.parametrize("name", ["train", "eval", "generate"])
def test_primary_configs_compose(name: str, tmp_path: Path) -> None:
    cfg = compose_config(name, [] if name == "train" else ["ckpt_path=x.ckpt"], tmp_path)
    assert cfg.task_name == name
