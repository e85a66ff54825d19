"""Turning a trained model into text, on token ids: sampling and streaming generation
(`sampling`), many requests decoded together (`batch`), token log-probabilities (`logprobs`),
int8 weights (`quantize`), a conversation's history (`chat`), and ids to streamable text
(`textstream`)."""

from tinyllm.inference.sampling import check_sampling_args, generate, sample_next

__all__ = ["check_sampling_args", "generate", "sample_next"]
