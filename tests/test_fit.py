"""Every model option against every data option: `check_fit` passes the pairs that fit and
refuses the others in one line that names options which do fit.

The pairs are composed by Hydra from configs/ (each group option once, then spliced), so a new
model or data option is covered the day it is added. What fits is decided here from the data's
kind and the model's task class, independently of `provides` / `learning`.
"""

from __future__ import annotations

import re

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from bigmodel.config_fit import check_fit
from bigmodel.errors import UserError
from tests.conftest import CONFIGS, compose_config

# the data modules by what their batches are, and the tasks that learn from each
DATA_KIND = {
    "bigmodel.data.ImageDataModule": "images",
    "bigmodel.data.AudioDataModule": "audio",
    "bigmodel.data.TextDataModule": "text",
    "bigmodel.data.TextStreamDataModule": "text",
    "bigmodel.data.TranslationDataModule": "pairs",
    "bigmodel.data.RegressionDataModule": "vectors",
    "bigmodel.data.ChatDataModule": "conversations",
    "bigmodel.data.PreferenceDataModule": "preference pairs",
}
# a model fits a kind of data through its task and its net (a CNN on images, not on audio)
NET_KIND = {
    "bigmodel.nets.CNN": "images",
    "bigmodel.nets.ViT": "images",
    "bigmodel.nets.AudioCNN": "audio",
    "bigmodel.nets.MLP": "vectors",
    "bigmodel.nets.Seq2SeqTransformer": "pairs",
}
LANGUAGE_TASK = "bigmodel.tasks.LanguageModel"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def kind_of_model(model) -> str:
    """What data a model option takes: any net of a language-model task reads text."""
    if model._target_ == LANGUAGE_TASK:
        return "text"
    return NET_KIND[model.net._target_]


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit")
    base = compose_config("train", [], tmp, hydra=True)
    models = {m: compose_config("train", [f"model={m}"], tmp).model for m in options("model")}
    datas = {}
    for d in options("data"):
        datas[d] = compose_config("train", [f"data={d}"], tmp).data
    return base, models, datas


def test_every_model_and_data_pair(composed):
    base, models, datas = composed
    refused = 0
    for m, model in models.items():
        for d, data in datas.items():
            cfg = base.copy()
            with open_dict(cfg):
                cfg.model, cfg.data, cfg.loss = model, data, None
                cfg.hydra.runtime.choices.model = m
                cfg.hydra.runtime.choices.data = d
            HydraConfig.instance().set_config(cfg)
            fits = kind_of_model(model) == DATA_KIND[data._target_]
            if fits:
                check_fit(cfg)
                continue
            with pytest.raises(UserError) as e:
                check_fit(cfg)
            refused += 1
            line = str(e.value)
            assert "\n" not in line and f"data={d}" in line, line
            # every model it offers fits this data, and the offer holds all that do
            offered = set(re.findall(r"model=(\w+)", line.partition(": use ")[2]))
            fitting = {n for n, o in models.items() if kind_of_model(o) == DATA_KIND[data._target_]}
            assert offered == fitting, (m, d, line)
    assert refused > len(models) * len(datas) // 2  # most pairs do not fit


@pytest.mark.parametrize("loss", options("loss"))
@pytest.mark.parametrize("model", ["cnn", "mlp", "seq2seq", "gpt"])
def test_every_loss_against_every_task(composed, tmp_path, model, loss):
    """A loss fits classification, regression or translation by what it computes; a language
    model takes none; refusals offer exactly the losses that fit."""
    base, models, _ = composed
    cfg = base.copy()
    loss_cfg = compose_config("train", [f"loss={loss}"], tmp_path).loss
    with open_dict(cfg):
        cfg.model, cfg.loss = models[model], loss_cfg
        cfg.data = OmegaConf.create({"_target_": "tests.test_fit.NoData"})
        cfg.hydra.runtime.choices.loss = loss
    HydraConfig.instance().set_config(cfg)
    takes = {
        "cnn": {"cross_entropy", "hinge"},
        "mlp": {"mse", "l1", "huber"},
        "seq2seq": {"cross_entropy"},
        "gpt": set(),
    }[model]
    if loss in takes:
        check_fit(cfg)
        return
    with pytest.raises(UserError) as e:
        check_fit(cfg)
    line = str(e.value)
    assert line.startswith(f"loss={loss}"), line
    assert set(re.findall(r"loss=(\w+)", line.partition(": use ")[2])) == takes, line


class NoData:
    """A data target with no declared kind: only the loss is judged."""
