"""Predict over files: `python predict.py ckpt_path=PATH|model_dir=DIR input=PATH output=FILE`."""

from omegaconf import DictConfig

from bigmodel.cli import entry


@entry("predict")
def main(cfg: DictConfig) -> None:
    # imported here, so that `--help` answers without loading torch and Lightning
    from bigmodel.deploy.predict import predict

    predict(cfg)


if __name__ == "__main__":
    main()
