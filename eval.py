"""Test a checkpoint: `python eval.py ckpt_path=PATH [data.split=val]`."""

from omegaconf import DictConfig

from bigmodel.cli import entry


@entry("eval")
def main(cfg: DictConfig) -> None:
    from bigmodel.utils import apply_extras

    apply_extras(cfg)  # the run directory and options first, before torch and Lightning load
    # imported here, so that `--help` and `--cfg job` answer without loading them
    from bigmodel.run import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    main()
