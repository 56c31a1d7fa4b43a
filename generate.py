"""Sample from a checkpoint: `python generate.py ckpt_path=PATH prompt="The" max_new_tokens=200`."""

from omegaconf import DictConfig

from bigmodel.cli import entry


@entry("generate", raw=("prompt", "text"))
def main(cfg: DictConfig) -> None:
    # imported here, so that `--help` answers without loading torch and Lightning
    from bigmodel.run import generate

    generate(cfg)


if __name__ == "__main__":
    main()
