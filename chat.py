"""Chat with a language model: `python chat.py ckpt_path=PATH|model_dir=DIR [system="..."]`."""

from omegaconf import DictConfig

from bigmodel.cli import entry


@entry("chat", raw=("system",))
def main(cfg: DictConfig) -> None:
    # imported here, so that `--help` answers without loading torch and Lightning
    from bigmodel.deploy.chat import chat

    chat(cfg)


if __name__ == "__main__":
    main()
