"""Plain torch nets. They know nothing of Lightning; configs pick them by `_target_`."""

from bigmodel.nets.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
