"""qa_accuracy: prompts are the story plus the chat so far, answers are scored exactly; held_out_qa,
the end-of-run figure of a fine-tuning run, is the same score or None when there is nothing to ask."""

from __future__ import annotations

import json

import pytest

import tinyllm.eval.qa as qa
from tinyllm.data.builtin import BuiltinCorpus
from tinyllm.data.document import Document, tokenize_document
from tinyllm.data.prepare import PrepareOptions, prepare
from tinyllm.data.source_specs import resolve_sources
from tinyllm.errors import UserError
from tinyllm.eval.qa import answer_correct, held_out_documents, held_out_qa, qa_accuracy, questions
from tinyllm.model.gpt import GPT, GPTConfig
from tinyllm.tokenizer import EOT, IM_END, get_tokenizer


def chat_docs(n: int = 40) -> list[Document]:
    return [d for d in (BuiltinCorpus(seed=3).document(i) for i in range(n)) if d.messages]


class Oracle:
    """Stands in for `generate`: continues a prompt with what the full document says comes next.

    It knows the documents' ids, not the questions, so it answers only a prompt that is exactly
    a document's prefix up to an answer; `right` picks which questions it answers correctly.
    """

    def __init__(self, docs: list[Document], right=lambda question: True) -> None:
        tok = get_tokenizer()
        self.docs = [([EOT, *tokenize_document(tok, d)], d) for d in docs]  # as a model reads one
        self.right, self.calls = right, 0

    def __call__(self, model, prompt_ids, max_new_tokens, *, temperature, stop_ids):
        assert temperature == 0 and set(stop_ids) >= {IM_END}
        self.calls += 1
        n = len(prompt_ids)
        ids, doc = next((ids, d) for ids, d in self.docs if ids[:n] == prompt_ids)
        question = get_tokenizer().decode(prompt_ids).rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]
        out = []
        for t in ids[n:] if self.right(question) else get_tokenizer().encode(" Nobody knows.") + [IM_END]:
            if t in stop_ids or len(out) == max_new_tokens:
                break
            out.append(t)
        return iter(out)


@pytest.fixture
def model() -> GPT:
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=256))


def test_scoring_is_exact_up_to_surrounding_whitespace():
    assert answer_correct(" Tom.\n", "Tom.")
    assert not answer_correct("Tom", "Tom.") and not answer_correct("tom.", "Tom.")
    assert not answer_correct("Tom. Mia.", "Tom.")


def test_each_question_is_the_story_and_the_chat_up_to_it():
    tok = get_tokenizer()
    doc = Document(text="Mia had a red kite.", messages=(
        {"role": "user", "content": "Who has the kite?"}, {"role": "assistant", "content": "Mia."},
        {"role": "user", "content": "What colour is the kite?"}, {"role": "assistant", "content": "Red."}))
    qs = list(questions([doc, Document(text="No questions here.")], tok))
    assert [(q.question, q.reference) for q in qs] == [("Who has the kite?", "Mia."), ("What colour is the kite?", "Red.")]
    assert tok.decode(qs[1].prompt) == (
        "<|endoftext|>Mia had a red kite.<|im_start|>user\nWho has the kite?<|im_end|>\n<|im_start|>assistant\n"
        "Mia.<|im_end|>\n<|im_start|>user\nWhat colour is the kite?<|im_end|>\n<|im_start|>assistant\n")
    # The prompt is the document's own ids up to the answer, after the <|endoftext|> every
    # document follows in training.
    full = [EOT, *tokenize_document(tok, doc)]
    for q in qs:
        assert full[: len(q.prompt)] == q.prompt
        assert full[len(q.prompt) :][: len(tok.encode(q.reference)) + 1] == tok.encode(q.reference) + [IM_END]


def test_oracle_scores_one(monkeypatch, model):
    docs = chat_docs()
    oracle = Oracle(docs)
    monkeypatch.setattr(qa, "generate", oracle)
    r = qa_accuracy(model, docs, max_questions=1000)
    n = sum(len(d.messages) // 2 for d in docs)
    assert (r.correct, r.total, r.accuracy, r.skipped) == (n, n, 1.0, 0) and oracle.calls == n
    assert all(e.answer == e.reference for e in r.examples)


def test_partly_right_oracle_scores_its_share(monkeypatch, model):
    docs = chat_docs()
    monkeypatch.setattr(qa, "generate", Oracle(docs, right=lambda q: q.startswith("Who")))
    r = qa_accuracy(model, docs, max_questions=1000)
    asked = [m["content"] for d in docs for m in d.messages if m["role"] == "user"]
    share = sum(q.startswith("Who") for q in asked)
    assert 0 < share < len(asked) and r.correct == share and r.accuracy == pytest.approx(share / len(asked))


def test_untrained_model_gets_nothing_right(model):
    r = qa_accuracy(model, chat_docs(), max_questions=5)
    assert r.total == 5 and r.accuracy == 0.0 and len(r.examples) == 5


def test_questions_come_from_the_val_split_of_the_shards(builtin_data, monkeypatch, model):
    out, m = builtin_data
    docs = list(held_out_documents(out))
    assert len(docs) == m["sources"]["builtin"]["splits"]["val"]["documents"]
    corpus = {d.rendered() for d in (BuiltinCorpus(seed=0).document(i) for i in range(200))}
    assert all(d.rendered() in corpus for d in docs)  # the builtin stories themselves
    monkeypatch.setattr(qa, "generate", Oracle(docs))
    r = qa_accuracy(model, out, max_questions=1000)
    assert r.accuracy == 1.0 and r.total == sum(len(d.messages or ()) // 2 for d in docs) > 0
    assert qa_accuracy(model, out, max_questions=3).total == 3


def test_questions_longer_than_the_context_are_skipped_and_counted(monkeypatch):
    docs = chat_docs()
    monkeypatch.setattr(qa, "generate", Oracle(docs))
    small = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=96))
    r = qa_accuracy(small, docs, max_questions=1000)
    assert r.skipped > 0 and r.total > 0 and r.accuracy == 1.0
    with pytest.raises(UserError, match="did not fit the model's context of 16"):
        qa_accuracy(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)), docs)
    with pytest.raises(UserError, match="no questions to ask: there are none"):
        qa_accuracy(small, [Document(text="A story.")])


def test_data_without_the_builtin_source_is_named(tmp_path, model):
    with pytest.raises(UserError, match="run tinyllm prepare"):
        qa_accuracy(model, tmp_path / "nothing")
    (tmp_path / "notes").mkdir()
    for i in range(12):
        (tmp_path / "notes" / f"{i}.txt").write_text(f"Note {i}: nothing to ask about.")
    prepare(resolve_sources([str(tmp_path / "notes")]), tmp_path / "data", PrepareOptions(progress=False))
    with pytest.raises(UserError, match=r"has no builtin source \(it has local-notes\).*--source builtin"):
        qa_accuracy(model, tmp_path / "data")


def test_held_out_qa_is_qa_accuracy_on_the_held_out_stories(builtin_data, monkeypatch, model):
    out, _ = builtin_data
    monkeypatch.setattr(qa, "generate", Oracle(list(held_out_documents(out)), right=lambda q: "Who" in q))
    assert held_out_qa(model, out, 5) == qa_accuracy(model, out, max_questions=5)
    assert held_out_qa(model, out, 0) is None


def test_no_held_out_qa_when_the_builtin_stories_are_all_trained_on(tmp_path, model):
    # `--source builtin --val-source FILE`: every story goes to train, so there is nothing to ask;
    # a fine-tuning run's end-of-run QA is left out rather than failing the finished run.
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": f"note {i}: the sky was blue."}) + "\n" for i in range(5)))
    ds = tmp_path / "ds"
    prepare(resolve_sources([], val_specs=[str(held)]), ds, PrepareOptions(max_tokens=5_000, progress=False))
    assert held_out_qa(model, ds, 200) is None
