"""Every worked example reaches its documented quality, run exactly as the README writes it.

`-m slow`: each trains for real (one to ten minutes on 2 cores). The fast suite runs each of them
for a few steps through tests/test_readme.py (every experiment has a README command).
"""

from __future__ import annotations

import json
import sys

import pytest
from omegaconf import OmegaConf

from tests import forkserver
from tests.conftest import ROOT, run_cli, run_dirs

pytestmark = pytest.mark.slow

# experiment -> (metric, floor or ceiling, the direction), as the README states them
FLOORS = {
    "digits_cnn": ("test/acc", ">=", 0.97),
    "digits_vit": ("test/acc", ">=", 0.95),  # README: about 97.5 %
    "spoken_digits": ("test/acc", ">=", 0.95),  # README: about 98 %, unseen speakers
    # the noise floor is data.noise ** 2 = 0.01: the best any model can do
    "regression": ("test/mse", "<=", 3 * 0.01),
    "translation": ("test/bleu", ">=", 90.0),
}


def _metrics(root) -> dict[str, float]:
    (run,) = run_dirs(root)
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_experiment_reaches_its_documented_quality(name, tmp_path):
    run_cli("train.py", f"experiment={name}", cwd=tmp_path, timeout=1800)
    metric, op, bound = FLOORS[name]
    value = _metrics(tmp_path)[metric]
    print(f"experiment={name}: {metric} = {value:.4f} ({op} {bound})")
    assert value >= bound if op == ">=" else value <= bound, (name, metric, value)


def test_char_speedrun_reaches_the_target_on_the_bench_corpus(tmp_path):
    """The CPU speedrun's recipe gets to nanoGPT's val loss (1.886, every window of the split)."""
    corpus = tmp_path / "data" / "shakespeare.txt"
    forkserver.run(
        [sys.executable, str(ROOT / "bench" / "shakespeare.py"), "--out", str(corpus)], check=True
    )
    run_cli("train.py", "experiment=char_speedrun", f"data.path={corpus}", cwd=tmp_path)
    (run,) = run_dirs(tmp_path)
    value = _metrics(tmp_path)["val/loss"]
    print(f"experiment=char_speedrun: val/loss = {value:.4f} (<= 1.886)")
    assert value <= 1.886
    # scored on every window of the validation split (no cap), once, at the end
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert cfg.data.max_eval_windows is None
    assert cfg.trainer.val_check_interval == cfg.trainer.max_steps == 180


def test_baby_gpt_on_the_bench_corpus(tmp_path):
    """nanoGPT's baby GPT on the ~1.1 MB Shakespeare corpus: val/loss <= 1.95 in 2000 steps."""
    corpus = tmp_path / "data" / "shakespeare.txt"
    forkserver.run(
        [sys.executable, str(ROOT / "bench" / "shakespeare.py"), "--out", str(corpus)], check=True
    )
    run_cli("train.py", "experiment=baby_gpt", f"data.path={corpus}", cwd=tmp_path, timeout=1800)
    value = _metrics(tmp_path)["val/loss"]
    print(f"experiment=baby_gpt: val/loss = {value:.4f} (<= 1.95)")
    assert value <= 1.95
