"""Sample from a checkpoint: `python generate.py ckpt_path=PATH prompt="The" max_new_tokens=200`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="generate")
def main(cfg: DictConfig) -> None:
    # imported here, so that `--help` answers without loading torch and Lightning
    from bigmodel.run import generate

    generate(cfg)


if __name__ == "__main__":
    main()
