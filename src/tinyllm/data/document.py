"""The unit every source yields and `prepare` tokenizes: one document.

A document is ordinary text, optionally followed by a ChatML conversation (instruction datasets
are only a conversation; the builtin corpus is a story followed by questions about it). Keeping
the conversation structured, not pre-rendered, is what lets special ids come only from the chat
template: text is always encoded as plain text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tinyllm.tokenizer import EOT, Tokenizer


@dataclass(frozen=True)
class Document:
    text: str = ""
    # A ChatML conversation after `text`: ({"role": ..., "content": ...}, ...).
    messages: tuple[dict, ...] | None = None
    # Natural-log probability of this exact document under the process that generated it; known
    # only for the builtin corpus, where it gives the entropy floor.
    logprob: float | None = None

    def rendered(self) -> str:
        """The document as the text its token ids decode to (without the trailing <|endoftext|>)."""
        chat = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in self.messages or ())
        return self.text + chat


def tokenize_document(tok: Tokenizer, doc: Document, text_ids: Sequence[int] | None = None) -> list[int]:
    """Ids for one document, ending with <|endoftext|>.

    `text_ids` lets a caller pass ids it already computed for `doc.text` with `encode_batch`.
    """
    ids = list(text_ids) if text_ids is not None else tok.encode(doc.text)
    if doc.messages:
        ids += tok.render_chat(doc.messages).ids
    ids.append(EOT)
    return ids
