"""Every config file in configs/ is composed by Hydra and what it describes is instantiated."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from hydra._internal.callbacks import Callbacks
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from bigmodel.errors import UserError
from bigmodel.hardware import resolve_precision
from bigmodel.run import build_task, build_trainer, instantiate_all
from bigmodel.sweep import OptunaSweep, search_space, trial_overrides
from hydra_plugins.bigmodel_optuna_sweeper.config import BigmodelOptunaSweeperConf
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
    # the GPU presets, one block deep: their shapes checked without gigabytes of weights
    ("model", "smollm2_135m"): ["model.net.n_layer=1"],
    ("model", "qwen3_0_6b"): ["model.net.n_layer=1"],
    ("model", "llama3_2_1b"): ["model.net.n_layer=1"],
    ("model", "mistral_7b"): ["model.net.n_layer=1", "model.net.intermediate_size=512"],
    ("loss", "cross_entropy"): ["model=cnn", "data=digits"],
    ("loss", "hinge"): ["model=cnn", "data=digits"],
    ("loss", "mse"): ["model=mlp", "data=regression"],
    ("loss", "l1"): ["model=mlp", "data=regression"],
    ("loss", "huber"): ["model=mlp", "data=regression"],
}
# Groups whose options are composed through `hydra` (sweepers, launchers), not the job config.
HYDRA_GROUPS = {"hparams_search", "launcher", "hydra"}


def group_options() -> list[tuple[str, str]]:
    out = []
    for f in sorted(CONFIGS.rglob("*.yaml")):
        rel = f.relative_to(CONFIGS)
        if len(rel.parts) == 1:
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
    if group == "strategy":
        return  # handed to a Trainer by check_strategy
    # Accelerator-specific trainers (gpu, ddp) are checked for their keys on the CPU here,
    # with precision=auto resolved as the runner resolves it (bigmodel.run.build_trainer)
    precision = resolve_precision(cfg.trainer.get("precision"), "cpu")
    hydra.utils.instantiate(
        cfg.trainer,
        accelerator="cpu",
        devices=1,
        strategy="auto",
        logger=False,
        precision=precision,
    )


# Strategies Lightning refuses on a CPU accelerator when the Trainer is built (FSDP1 is CUDA only).
CPU_REFUSED = {"fsdp": "requires a GPU accelerator"}


def check_strategy(cfg: DictConfig, option: str) -> None:
    """Build the Trainer the runner builds, on the CPU, and check the strategy it holds."""
    if option.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    if option in CPU_REFUSED:
        # one line naming the trainer (bigmodel.run.build_trainer), not a traceback
        with pytest.raises(UserError, match=CPU_REFUSED[option]):
            build_trainer(cfg, accelerator="cpu", devices=1, logger=False)
        strategy = hydra.utils.instantiate(cfg.strategy)
    else:
        trainer = build_trainer(cfg, accelerator="cpu", devices=1, logger=False)
        strategy = trainer.strategy
        assert isinstance(trainer.accelerator, L.pytorch.accelerators.CPUAccelerator)
    conf = cfg.strategy
    name = type(strategy).__name__
    if option == "auto":
        assert name == "SingleDeviceStrategy", name
    elif option in ("ddp", "ddp_spawn"):
        assert name == "DDPStrategy", name
        assert strategy._ddp_kwargs["gradient_as_bucket_view"] is True
        assert strategy._ddp_kwargs["find_unused_parameters"] is False
        # ddp re-runs the script per rank; ddp_spawn spawns workers from this process
        want = "_MultiProcessingLauncher" if option == "ddp_spawn" else "_SubprocessScriptLauncher"
        assert type(strategy.launcher).__name__ == want
        if option == "ddp_spawn":
            assert strategy.launcher._start_method == "spawn"
    elif option.startswith("deepspeed"):
        assert name == "DeepSpeedStrategy", name
        zero = strategy.config["zero_optimization"]
        assert zero["stage"] == conf.stage
        for key in ("allgather_bucket_size", "reduce_bucket_size"):
            if key in conf:
                assert zero[key] == conf[key], key
        if conf.get("offload_optimizer"):
            assert zero["offload_optimizer"]["device"] == conf.offload_optimizer_device == "cpu"
            assert zero["offload_optimizer"]["pin_memory"] is True
            # DeepSpeed refuses a torch optimizer with offload: the config swaps in its CPU Adam
            assert cfg.optimizer._target_ == "deepspeed.ops.adam.DeepSpeedCPUAdam"
        else:
            assert "offload_optimizer" not in zero
        assert ("offload_param" in zero) == bool(conf.get("offload_parameters"))
    elif option == "fsdp":
        assert name == "FSDPStrategy", name
        assert strategy.sharding_strategy.name == conf.sharding_strategy == "FULL_SHARD"
        assert strategy.cpu_offload.offload_params is False
        assert strategy._state_dict_type == "full"
        # one FSDP unit per module of the net's `blocks`, whatever the family
        assert type(strategy.kwargs["auto_wrap_policy"]).__name__ == "NetBlocks"
        assert not strategy._activation_checkpointing_kwargs  # off unless enabled=true
    elif option == "fsdp2":
        assert isinstance(strategy, L.pytorch.strategies.ModelParallelStrategy), name
        assert strategy._save_distributed_checkpoint is False
        assert strategy._tensor_parallel_size == 1
    else:
        pytest.fail(f"configs/strategy/{option}.yaml has no check here: add one")


def hydra_context(cfg: DictConfig) -> HydraContext:
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONFIGS)))
    return HydraContext(config_loader=loader, callbacks=Callbacks(cfg))


def build_sweeper(cfg: DictConfig) -> Sweeper:
    """The sweeper (and the launcher it sets up) that `train.py -m` builds from this config."""
    sweeper = Plugins.instance().instantiate_sweeper(
        config=cfg, hydra_context=hydra_context(cfg), task_function=lambda _: None
    )
    assert isinstance(sweeper.launcher, Launcher)
    return sweeper


def check_launcher(cfg: DictConfig, option: str, launcher: Launcher) -> None:
    """The launcher is the one the option names, with the option's own settings."""
    want = {"local": "BasicLauncher", "joblib": "JoblibLauncher", "slurm": "SlurmLauncher"}
    assert type(launcher).__name__ == want[option]
    own = OmegaConf.load(CONFIGS / "launcher" / f"{option}.yaml").get("hydra", {}).get("launcher")
    params = {"joblib": "joblib", "slurm": "params"}.get(option)
    for key in own or {}:
        assert getattr(launcher, params)[key] == cfg.hydra.launcher[key], key
    if option == "joblib":
        # as many worker processes as the sweeper launches at once (2 without an Optuna sweep)
        assert launcher.joblib["n_jobs"] == 2
    if option == "slurm":
        assert launcher.params["submitit_folder"].startswith(str(cfg.hydra.sweep.dir))


def check_optuna_sweep(cfg: DictConfig, option: str, sweeper: Sweeper, tmp_path: Path) -> None:
    """Create the study the sweep would, draw one trial and build that trial's job."""
    assert type(sweeper).__name__ == "BigmodelOptunaSweeper"
    sweep = OptunaSweep(BigmodelOptunaSweeperConf(**sweeper.settings), cfg, sweeper.launcher)
    space, fixed = search_space(sweep.s.params, [])
    assert set(space) == set(cfg.hydra.sweeper.params)
    study = sweep.load_study(fixed)
    assert study.direction.name.lower() == cfg.hydra.sweeper.direction
    conf = cfg.hydra.sweeper
    assert type(study.sampler).__name__ == conf.sampler._target_.rsplit(".", 1)[-1]
    assert type(study.pruner).__name__ == conf.pruner._target_.rsplit(".", 1)[-1]
    params = study.ask(space).params
    trial_cfg = compose_config(
        "train", [f"hparams_search={option}", *trial_overrides(params)], tmp_path / "trial"
    )
    for key, value in params.items():
        got = OmegaConf.select(trial_cfg, key)
        got = list(got) if isinstance(got, ListConfig) else got
        # list choices are kept as their override text in the study ("[16,32,64]")
        assert str(got).replace(" ", "") == str(value).replace(" ", ""), key
    instantiate_job(trial_cfg, "hparams_search")


@pytest.mark.parametrize(("group", "option"), group_options(), ids=lambda v: v)
def test_config_composes_and_instantiates(group: str, option: str, tmp_path: Path) -> None:
    if group in HYDRA_GROUPS:
        overrides = [f"{group}={option}"] if group != "hydra" else []
        cfg = compose_config("train", overrides, tmp_path, hydra=True)
        sweeper = build_sweeper(cfg)
        if group == "hparams_search":
            check_optuna_sweep(cfg, option, sweeper, tmp_path)
        else:
            assert type(sweeper).__name__ == "BasicSweeper"
            check_launcher(cfg, option if group == "launcher" else "local", sweeper.launcher)
        if group == "hydra":
            assert Path(cfg.hydra.run.dir).parent == tmp_path / "logs" / "train" / "runs"
            assert Path(cfg.hydra.sweep.dir).parent == tmp_path / "logs" / "train" / "multiruns"
        return
    overrides = [] if group == "local" else [f"{group}={option}", *PAIRED.get((group, option), [])]
    cfg = compose_config("train", overrides, tmp_path)
    if group == "logger" and option == "mlflow":
        pytest.importorskip("mlflow")
    instantiate_job(cfg, group)
    if group == "strategy":
        check_strategy(cfg, option)


@pytest.mark.parametrize("name", ["train", "eval", "generate"])
def test_primary_configs_compose(name: str, tmp_path: Path) -> None:
    cfg = compose_config(name, [] if name == "train" else ["ckpt_path=x.ckpt"], tmp_path)
    assert cfg.task_name == name


@pytest.mark.parametrize(
    ("overrides", "optimizer", "scheduler"),
    [
        ([], "bigmodel.muon.MuonAdamW", "bigmodel.optim.WarmupStableDecayLR"),  # the default
        (["model=speedrun"], "bigmodel.muon.MuonAdamW", "bigmodel.optim.WarmupStableDecayLR"),
        (["model=gpt"], "torch.optim.AdamW", "bigmodel.optim.WarmupCosineLR"),
        (["model=llama"], "torch.optim.AdamW", "bigmodel.optim.WarmupCosineLR"),
        # the command line outranks a preset's own choice
        (["optimizer=sgd"], "torch.optim.SGD", "bigmodel.optim.WarmupStableDecayLR"),
        (["scheduler=warmup_cosine"], "bigmodel.muon.MuonAdamW", "bigmodel.optim.WarmupCosineLR"),
        (
            ["model=gpt", "optimizer=muon"],
            "bigmodel.muon.MuonAdamW",
            "bigmodel.optim.WarmupCosineLR",
        ),
        # and so do experiments
        (
            ["experiment=baby_gpt", "data.path=x"],
            "torch.optim.AdamW",
            "bigmodel.optim.WarmupCosineLR",
        ),
    ],
)
def test_a_model_preset_chooses_its_optimizer_and_schedule(
    overrides, optimizer, scheduler, tmp_path
):
    """model=speedrun (the default) names Muon and warmup-stable-decay in its defaults list;
    the other presets keep train.yaml's AdamW and warmup-cosine, and the command line wins."""
    cfg = compose_config("train", overrides, tmp_path, hydra=True)
    assert cfg.optimizer._target_ == optimizer
    assert cfg.scheduler.scheduler._target_ == scheduler
