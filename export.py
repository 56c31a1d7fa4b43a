"""Export a checkpoint: `python export.py ckpt_path=PATH format=safetensors|onnx|hf out=DIR`."""

from omegaconf import DictConfig

from bigmodel.cli import entry


@entry("export")
def main(cfg: DictConfig) -> None:
    # imported here, so that `--help` answers without loading torch and Lightning
    from bigmodel.deploy.export import export

    export(cfg)


if __name__ == "__main__":
    main()
