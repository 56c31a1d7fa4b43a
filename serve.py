"""Serve a model over HTTP: `python serve.py ckpt_path=PATH|model_dir=DIR port=8000`."""

from omegaconf import DictConfig

from bigmodel.cli import entry


@entry("serve")
def main(cfg: DictConfig) -> None:
    # imported here, so that `--help` answers without loading torch, Lightning and LitServe
    from bigmodel.deploy.serve import serve

    serve(cfg)


if __name__ == "__main__":
    main()
