"""Export to other ecosystems: `hf` writes a Hugging Face transformers model folder, and
`hf_tokenizer` its tokenizer files; `gguf` writes one GGUF file for llama.cpp (imported from
`tinyllm.export.gguf` on use). transformers and gguf are imported only when an export runs, so
the rest of tinyllm works without them.
"""

from tinyllm.export.hf import export_hf, hf_architecture

__all__ = ["export_hf", "hf_architecture"]
