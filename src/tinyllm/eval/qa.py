"""Exact-answer accuracy on held-out builtin stories: does the model read the story?

Why it is shaped this way:
- The questions come from the val split's documents read back from the shards
  (`document_from_ids`), not regenerated from the builtin seed. The shards are by definition
  the stories the model was not trained on; regenerating them would mean replaying prepare's
  routing (hash bar, early-val rule, skipped records, caps) here, a second copy of that logic
  that could drift. Reading back also works for any seed or lexicon the dataset was made with.
- A builtin answer is fixed by its story ("Who has the kite?" -> "Tom."), so scoring is exact
  string equality after stripping whitespace: no partial credit, no judge.
- Each question is asked as the model would see it in a chat, through the tokenizer's
  `prompt_ids` (the prompt every surface uses): `<|endoftext|>`, the story, the conversation up
  to and including that question (earlier Q&A turns as context), then
  `<|im_start|>assistant\\n`; the answer is decoded greedily until a special id (`STOP_IDS`,
  what ends an answer in `tinyllm chat` and the server too). Generation is capped at the
  reference's length plus `ANSWER_SLACK` tokens: an answer still going after that cannot be an
  exact match. A question whose prompt and cap do not fit the model's context is skipped and
  counted, not cut (a cut story loses the facts).
- `answer_correct` is the scoring rule on its own, so it is tested without a model.
- `held_out_qa` is the figure a chat fine-tuning run reports at its end (`tinyllm.train.report`):
  the same scoring, except that data with no held-out builtin stories has nothing to ask and
  gives None rather than an error, so a finished run is not failed by its last figure.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from tinyllm.data.document import Document, document_from_ids
from tinyllm.data.manifest import load_manifest
from tinyllm.data.shards import Shard
from tinyllm.errors import UserError
from tinyllm.inference.sampling import generate
from tinyllm.tokenizer import STOP_IDS, VOCAB_SIZE, Tokenizer, get_tokenizer

ANSWER_SLACK = 4  # tokens allowed past the reference's length (whitespace, the stop token)


@dataclass(frozen=True)
class QAExample:
    question: str
    reference: str
    answer: str
    correct: bool


@dataclass(frozen=True)
class QAResult:
    correct: int
    total: int  # questions asked
    accuracy: float  # correct / total
    examples: tuple[QAExample, ...]  # every question asked, in order
    skipped: int = 0  # questions whose story did not fit the model's context


@dataclass(frozen=True)
class Question:
    prompt: list[int]  # <|endoftext|>, story, the chat up to this question, the assistant header
    question: str
    reference: str


def answer_correct(answer: str, reference: str) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return answer.strip() == reference.strip()


def held_out_documents(data_dir: str | Path, *, split: str = "val", source: str = "builtin") -> Iterator[Document]:
    """The documents of one source's split, read back from its shards in order; a dataset without
    that source is refused now, not when the documents are first read (after `tinyllm eval`'s loss pass)."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    if source not in manifest["sources"]:
        raise UserError(f"{data_dir} has no {source} source (it has {', '.join(manifest['sources'])}): "
                        f"question answering needs data prepared with --source {source}")
    return _read_back(data_dir, manifest["sources"][source]["splits"][split]["shards"])


def _read_back(data_dir: Path, shards: list[dict]) -> Iterator[Document]:
    tok = get_tokenizer()
    for entry in shards:
        shard = Shard(data_dir / entry["file"], VOCAB_SIZE, expect=entry)
        for i in range(shard.n_docs):
            yield document_from_ids(tok, shard.document(i).tolist())


def questions(docs: Iterable[Document], tok: Tokenizer) -> Iterator[Question]:
    """Every user turn answered by the next (assistant) turn, as a prompt with its reference."""
    for doc in docs:
        messages = doc.messages or ()
        for j, (msg, reply) in enumerate(zip(messages, messages[1:], strict=False)):
            if msg["role"] == "user" and reply["role"] == "assistant":
                prompt = tok.prompt_ids(doc.text, messages[: j + 1])
                yield Question(prompt, msg["content"], reply["content"])


def qa_accuracy(model: nn.Module, data: str | Path | Iterable[Document], *, max_questions: int = 200,
                split: str = "val") -> QAResult:
    """Greedy exact-answer accuracy on up to `max_questions` questions.

    `data` is a prepared dataset directory (its builtin source's `split` is read back from the
    shards) or the documents themselves.
    """
    if max_questions < 1:
        raise UserError(f"max_questions must be at least 1, got {max_questions}")
    tok = get_tokenizer()
    docs = held_out_documents(data, split=split) if isinstance(data, str | Path) else data
    block_size = model.config.block_size
    examples: list[QAExample] = []
    skipped = 0
    for q in questions(docs, tok):
        budget = len(tok.encode(q.reference)) + ANSWER_SLACK
        if len(q.prompt) + budget > block_size:
            skipped += 1
            continue
        ids = list(generate(model, q.prompt, budget, temperature=0, stop_ids=STOP_IDS))
        answer = tok.decode_text(ids)
        examples.append(QAExample(q.question, q.reference, answer, answer_correct(answer, q.reference)))
        if len(examples) == max_questions:
            break
    if not examples:
        why = f"{skipped} did not fit the model's context of {block_size} tokens" if skipped else "there are none"
        raise UserError(f"no questions to ask: {why}")
    correct = sum(e.correct for e in examples)
    return QAResult(correct, len(examples), correct / len(examples), tuple(examples), skipped)


def held_out_qa(model: nn.Module, data_dir: Path, questions: int) -> QAResult | None:
    """`qa_accuracy` on up to `questions` held-out builtin questions; None when there is nothing
    to ask (`questions` < 1, no builtin source, or its val split given to a `--val-source`).

    Raises UserError when no question fits the model's context.
    """
    builtin = load_manifest(data_dir)["sources"].get("builtin")
    if questions < 1 or builtin is None or not builtin["splits"]["val"]["documents"]:
        return None
    return qa_accuracy(model, data_dir, max_questions=questions)
