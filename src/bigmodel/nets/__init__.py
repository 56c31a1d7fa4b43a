"""Plain torch nets. They know nothing of Lightning; configs pick them by `_target_`.

Each net is built from a typed dataclass config, its `config_class` (`GPT(GPTConfig(...))`), or
from that config's fields as keyword arguments, which is how `model.net` in configs/model/ passes
them. The transformer layers they share are in layers.py.
"""

from bigmodel.nets.audio import AudioCNN, AudioCNNConfig, LogMel, SpecAugment
from bigmodel.nets.cnn import CNN, CNNConfig
from bigmodel.nets.gpt import GPT, GPTConfig
from bigmodel.nets.mlp import MLP, MLPConfig
from bigmodel.nets.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from bigmodel.nets.vit import ViT, ViTConfig

__all__ = [
    "AudioCNN",
    "AudioCNNConfig",
    "CNN",
    "CNNConfig",
    "GPT",
    "GPTConfig",
    "LogMel",
    "MLP",
    "MLPConfig",
    "Seq2SeqConfig",
    "Seq2SeqTransformer",
    "SpecAugment",
    "ViT",
    "ViTConfig",
]
