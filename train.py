"""Train a model: `python train.py [group=option ...] [key=value ...]` (see `--help`)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # imported here, so that `--help` and `--cfg job` answer without loading torch and Lightning
    from bigmodel.run import train
    from bigmodel.utils import apply_extras

    apply_extras(cfg)
    return train(cfg)


if __name__ == "__main__":
    main()
