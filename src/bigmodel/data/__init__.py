"""LightningDataModules per modality. They know nothing of models."""

from bigmodel.data.audio import AudioDataModule
from bigmodel.data.image import ImageDataModule
from bigmodel.data.regression import RegressionDataModule
from bigmodel.data.text import TextDataModule
from bigmodel.data.translation import TranslationDataModule

__all__ = [
    "AudioDataModule",
    "ImageDataModule",
    "RegressionDataModule",
    "TextDataModule",
    "TranslationDataModule",
]
