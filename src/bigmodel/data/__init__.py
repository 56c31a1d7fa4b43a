"""LightningDataModules per modality, on one base (`base.DataModule`). They know nothing of models.

To add a dataset: subclass `DataModule` (its module docstring says what to provide), put file
readers or generators in `sources/`, export the class here and give it `configs/data/<name>.yaml`.
"""

from bigmodel.data.audio import AudioDataModule
from bigmodel.data.base import DataModule
from bigmodel.data.chat import ChatDataModule
from bigmodel.data.image import ImageDataModule
from bigmodel.data.preference import PreferenceDataModule
from bigmodel.data.regression import RegressionDataModule
from bigmodel.data.text import TextDataModule
from bigmodel.data.text_stream import TextStreamDataModule
from bigmodel.data.translation import TranslationDataModule

__all__ = [
    "AudioDataModule",
    "ChatDataModule",
    "DataModule",
    "ImageDataModule",
    "PreferenceDataModule",
    "RegressionDataModule",
    "TextDataModule",
    "TextStreamDataModule",
    "TranslationDataModule",
]
