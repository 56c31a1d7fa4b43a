"""Train a model: `python train.py [group=option ...] [key=value ...]` (see `--help`)."""

from omegaconf import DictConfig

from bigmodel.cli import entry


@entry("train")
def main(cfg: DictConfig) -> float | None:
    from bigmodel.utils import apply_extras

    apply_extras(cfg)  # the run directory and options first, before torch and Lightning load
    # imported here, so that `--help` and `--cfg job` answer without loading them
    from bigmodel.run import train

    return train(cfg)


if __name__ == "__main__":
    main()
