"""Write tinyllm's tokenizer as Hugging Face tokenizer files (tokenizer.json + chat template).

Why it is shaped this way:
- The BPE comes from the same two GPT-2 files tinyllm's tokenizer reads (`vocab.bpe`,
  `encoder.json`, checked by `Tokenizer()`), built with the `tokenizers` library's byte-level BPE,
  whose pre-tokenizer regex is GPT-2's. (`GPT2TokenizerFast(vocab_file=..., merges_file=...)`
  silently yields empty token lists under transformers 5, so it is not used.) The four special
  tokens are added in id order and checked to land on tinyllm's ids.
- What the exported tokenizer does with special-token strings inside text: like every Hugging Face
  tokenizer, by default it maps the literal text `<|im_start|>` (and the other three) to the single
  special id, which tinyllm's `encode` never does (its prompt-injection guard). That default is what
  makes the chat template work when tokenized, so it stays; call the tokenizer with
  `split_special_tokens=True` to encode untrusted text exactly as `Tokenizer.prompt_ids` does.
- The chat template renders exactly the string of `Tokenizer.prompt_ids` (bos, then
  `render_chat`'s ChatML) and rejects the same bad messages. Tokenizing that string gives
  `prompt_ids`'s ids except where a message's content contains a special-token string (it
  becomes the special id: clean untrusted content first) or starts with a newline (BPE then
  merges it with the header's newline, whereas `render_chat` encodes header and content
  separately).
- A prompt gets exactly `Tokenizer.prompt_ids`'s ids: bos is `<|endoftext|>` (every sequence
  tinyllm reads starts a document after it), added to plain text by the post-processor
  (`tok(text)`), and written by the chat template itself, since `apply_chat_template` tokenizes
  with `add_special_tokens=False`. eos is `<|im_end|>` (an assistant turn ends there; the
  generation config lists every special id, as tinyllm stops at all of them), pad `<|pad|>`
  (never a target).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tinyllm.errors import UserError
from tinyllm.tokenizer import CHAT_ROLES, SPECIAL_TOKENS, VOCAB_SIZE, _gpt2_files, get_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"

# Jinja; mirrors Tokenizer.prompt_ids (bos, then render_chat) and its _check_message errors.
CHAT_TEMPLATE = (
    r"""{{- bos_token -}}
{%- for message in messages -%}
{%- if message['role'] not in ['""" + "', '".join(CHAT_ROLES) + r"""'] -%}
{{- raise_exception('message ' ~ loop.index0 ~ ' has role ' ~ message['role'] ~ ': a role must be one of """
    + ", ".join(CHAT_ROLES) + r"""') -}}
{%- endif -%}
{%- if message['content'] is not string -%}
{{- raise_exception('message ' ~ loop.index0 ~ ' (' ~ message['role'] ~ ') needs a string content') -}}
{%- endif -%}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""
)


def build_hf_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    """tinyllm's tokenizer as a transformers fast tokenizer (not yet saved)."""
    try:
        from tokenizers import AddedToken, decoders, pre_tokenizers, processors
        from tokenizers import Tokenizer as BackendTokenizer
        from tokenizers.models import BPE
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:
        raise UserError("export needs transformers and tokenizers: pip install 'transformers>=5' tokenizers") from e
    get_tokenizer()  # checks the GPT-2 files are the originals before we build from them
    vocab_bpe, encoder_json = _gpt2_files()
    backend = BackendTokenizer(BPE.from_file(encoder_json, vocab_bpe))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    by_id = sorted(SPECIAL_TOKENS, key=SPECIAL_TOKENS.get)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in by_id])
    got = {t: backend.token_to_id(t) for t in by_id}
    if got != SPECIAL_TOKENS or backend.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"exported tokenizer's special ids {got} differ from tinyllm's {SPECIAL_TOKENS}")
    named = {BOS_TOKEN, EOS_TOKEN, PAD_TOKEN}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[t for t in by_id if t not in named],
        add_bos_token=True,
        model_max_length=model_max_length,
        # Decoding must give back tiktoken's text exactly ("a , b" stays "a , b").
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_hf_tokenizer(out_dir: Path, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into out_dir."""
    build_hf_tokenizer(model_max_length).save_pretrained(str(out_dir))
