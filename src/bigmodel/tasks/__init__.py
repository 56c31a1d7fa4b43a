"""LightningModules, one per kind of learning. They know nets only by their forward signature."""

from bigmodel.tasks.base import Task
from bigmodel.tasks.language_model import LanguageModel

__all__ = ["LanguageModel", "Task"]
