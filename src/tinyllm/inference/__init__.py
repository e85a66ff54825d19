"""Turning a trained model into text: token sampling and streaming generation (ids only)."""

from tinyllm.inference.sampling import check_sampling_args, generate, sample_next

__all__ = ["check_sampling_args", "generate", "sample_next"]
