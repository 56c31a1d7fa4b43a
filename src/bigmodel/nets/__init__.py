"""Plain torch nets. They know nothing of Lightning; configs pick them by `_target_`."""

from bigmodel.nets.audio import AudioCNN, LogMel, SpecAugment
from bigmodel.nets.cnn import CNN
from bigmodel.nets.gpt import GPT, GPTConfig
from bigmodel.nets.mlp import MLP
from bigmodel.nets.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from bigmodel.nets.vit import ViT, ViTConfig

__all__ = [
    "AudioCNN",
    "CNN",
    "GPT",
    "GPTConfig",
    "LogMel",
    "MLP",
    "Seq2SeqConfig",
    "Seq2SeqTransformer",
    "SpecAugment",
    "ViT",
    "ViTConfig",
]
