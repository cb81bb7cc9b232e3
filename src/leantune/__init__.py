"""leantune: efficient fine-tuning of transformer language models from one validated config."""

__version__ = "0.1.0"
