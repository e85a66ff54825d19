"""The unit every source yields and `prepare` tokenizes: one document.

A document is ordinary text, optionally followed by a ChatML conversation (instruction datasets
are only a conversation; the builtin corpus is a story followed by questions about it). Keeping
the conversation structured, not pre-rendered, is what lets special ids come only from the chat
template: text is always encoded as plain text. It also gives each token its place in the loss
mask for chat fine-tuning: the template marks the assistant's tokens, nothing else is marked.

`document_from_ids` inverts `document_tokens`, so evaluation can read held-out documents back
from the shards (the exact data a model was not trained on) instead of re-deriving the split.

A document's ids end with `<|endoftext|>` and a model always reads them after one: the previous
document's in a packed stream, the one the loader puts first in a padded row, the one
`Tokenizer.prompt_ids` starts every prompt with. So the QA evaluation's prompt for a question is
exactly `<|endoftext|>` and this document's ids up to the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tinyllm.errors import UserError
from tinyllm.tokenizer import EOT, IM_END, IM_START, Tokenizer


@dataclass(frozen=True)
class Document:
    text: str = ""
    # A ChatML conversation after `text`: ({"role": ..., "content": ...}, ...).
    messages: tuple[dict, ...] | None = None
    # Natural-log probability of this exact document under the process that generated it; known
    # only for the builtin corpus, where it gives the entropy floor.
    logprob: float | None = None
    # Where a reader found it ("notes/a.jsonl line 7"), so that an error found while tokenizing it
    # (a bad chat role) names the file; "" when the source's record number is all there is.
    where: str = field(default="", compare=False, repr=False)

    def rendered(self) -> str:
        """The document as the text its token ids decode to (without the trailing <|endoftext|>)."""
        chat = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in self.messages or ())
        return self.text + chat


def document_tokens(tok: Tokenizer, doc: Document, text_ids: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """Ids for one document, ending with <|endoftext|>, and its assistant mask (1 = assistant token).

    The mask is the chat template's (`render_chat(...).mask`: assistant content and its
    `<|im_end|>`); plain text and the trailing <|endoftext|> are 0. `text_ids` lets a caller pass
    ids it already computed for `doc.text` with `encode_batch`.
    """
    ids = list(text_ids) if text_ids is not None else tok.encode(doc.text)
    mask = [0] * len(ids)
    if doc.messages:
        chat = tok.render_chat(doc.messages)
        ids += chat.ids
        mask += chat.mask
    ids.append(EOT)
    mask.append(0)
    return ids, mask


def tokenize_document(tok: Tokenizer, doc: Document, text_ids: Sequence[int] | None = None) -> list[int]:
    """Ids for one document, ending with <|endoftext|> (`document_tokens` without the mask)."""
    return document_tokens(tok, doc, text_ids)[0]


def document_from_ids(tok: Tokenizer, ids: Sequence[int]) -> Document:
    """The document whose `document_tokens` ids are `ids` (as a shard stores it).

    Special ids enter a document only through the template, so the first `<|im_start|>` is where
    the text ends, and each message is `<|im_start|>role\\ncontent<|im_end|>\\n`. Raises
    ValueError for ids that no document renders to.
    """
    ids = list(ids)
    if not ids or ids[-1] != EOT:
        raise ValueError("a document's ids end with <|endoftext|>")
    ids.pop()
    start = ids.index(IM_START) if IM_START in ids else len(ids)
    text, chat = tok.decode(ids[:start]), ids[start:]
    newline = tok.encode("\n")
    messages = []
    while chat:
        end = chat.index(IM_END) if IM_END in chat else -1
        role, sep, content = tok.decode(chat[1:end]).partition("\n") if end > 0 else ("", "", "")
        if chat[0] != IM_START or not sep or chat[end + 1 : end + 1 + len(newline)] != newline:
            raise ValueError(f"ids after the text are not ChatML messages: {chat[:12]}...")
        messages.append({"role": role, "content": content})
        chat = chat[end + 1 + len(newline) :]
    doc = Document(text=text, messages=tuple(messages) or None)
    try:
        again = tokenize_document(tok, doc)
    except UserError as e:  # a role the template does not know
        raise ValueError(f"ids after the text are not ChatML messages: {e}") from None
    if again != [*ids, EOT]:
        raise ValueError("the ids do not render back to themselves: they are not one document")
    return doc
