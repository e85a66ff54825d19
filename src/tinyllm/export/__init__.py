"""Export to other ecosystems: `hf` writes a Hugging Face transformers model folder, and
`hf_tokenizer` its tokenizer files. transformers is imported only when an export runs, so the
rest of tinyllm works without it.
"""

from tinyllm.export.hf import export_hf, hf_architecture

__all__ = ["export_hf", "hf_architecture"]
