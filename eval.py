"""Test a checkpoint: `python eval.py ckpt_path=PATH [data.split=val]`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    # imported here, so that `--help` and `--cfg job` answer without loading torch and Lightning
    from bigmodel.run import evaluate
    from bigmodel.utils import apply_extras

    apply_extras(cfg)
    evaluate(cfg)


if __name__ == "__main__":
    main()
