"""bigmodel: a Lightning + Hydra research template for training big models."""

__version__ = "0.1.0"
