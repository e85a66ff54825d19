"""tinyllm: train small GPT-style language models from scratch and take them to a chat model."""

__version__ = "0.1.0"
