"""Sample from a checkpoint: `python generate.py ckpt_path=PATH prompt="The" max_new_tokens=200`."""

import hydra
from omegaconf import DictConfig

from bigmodel.run import generate


@hydra.main(version_base="1.3", config_path="configs", config_name="generate")
def main(cfg: DictConfig) -> None:
    generate(cfg)


if __name__ == "__main__":
    main()
