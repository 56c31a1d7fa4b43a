"""LightningModules, one per kind of learning. They know nets through the Protocols of
bigmodel.tasks.protocols: what each task calls on its net, and nothing else."""

from bigmodel.tasks.base import Task
from bigmodel.tasks.chat import ChatModel
from bigmodel.tasks.classification import Classifier
from bigmodel.tasks.language_model import LanguageModel
from bigmodel.tasks.preference import PreferenceModel
from bigmodel.tasks.regression import Regressor
from bigmodel.tasks.seq2seq import Seq2Seq

__all__ = [
    "ChatModel",
    "Classifier",
    "LanguageModel",
    "PreferenceModel",
    "Regressor",
    "Seq2Seq",
    "Task",
]
