"""The GPT model: `gpt` (config and network), `loss` (fused head + cross-entropy), `kv_cache`,
`positions` (RoPE tables; documents within a packed row) and `linear` (a one-row bf16 Linear as a
matrix-vector product, for decoding).

The model package imports nothing from data, train or inference: it maps token ids to logits or a
loss, and is the same code for training and decoding.
"""

from tinyllm.model.gpt import GPT, GPTConfig
from tinyllm.model.kv_cache import KVCache
from tinyllm.model.loss import fused_linear_cross_entropy

__all__ = ["GPT", "GPTConfig", "KVCache", "fused_linear_cross_entropy"]
