"""One prompt on every surface: the same conversation (or text) reaches the model as the same ids
from `tinyllm chat`, `tinyllm sample`, the server, the QA evaluation, the SFT training rows and the
exported Hugging Face tokenizer, namely `Tokenizer.prompt_ids`'s.

Each surface runs its real code path around a model that records the ids of every prompt it is
asked to continue (its first forward of a generation)."""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it at import

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from tinyllm.cli import sample
from tinyllm.data.document import Document
from tinyllm.data.loader import TokenLoader
from tinyllm.data.prepare import PrepareOptions, prepare
from tinyllm.data.source_specs import resolve_sources
from tinyllm.eval.qa import qa_accuracy
from tinyllm.export.hf_tokenizer import write_hf_tokenizer
from tinyllm.inference.chat import ChatSession
from tinyllm.model.gpt import GPT, GPTConfig
from tinyllm.serve import BackgroundServer
from tinyllm.tokenizer import EOT, get_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You answer questions about stories."},
    {"role": "user", "content": "Who found the kite?"},
    {"role": "assistant", "content": "Noah."},
    {"role": "user", "content": "Who flew it?"},
]
ANSWER = {"role": "assistant", "content": "A brave bird."}
TEXT = "Once upon a time, a brave bird"


class Recorder(GPT):
    """A tiny GPT that keeps the ids of each prompt it starts to continue."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(GPTConfig(block_size=128, n_layer=1, n_head=2, n_embd=32))
        self.prompts: list[list[int]] = []

    def forward(self, idx, targets=None, kv_cache=None, **kw):
        if kv_cache is None or kv_cache.length == 0:
            self.prompts.append(idx[0].tolist())
        return super().forward(idx, targets, kv_cache, **kw)


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    write_hf_tokenizer(out, model_max_length=128)
    return AutoTokenizer.from_pretrained(out, local_files_only=True)


def chat_session_ids() -> list[int]:
    model = Recorder()
    session = ChatSession(model, get_tokenizer(), system=CONVERSATION[0]["content"], max_new_tokens=1,
                          temperature=0)
    session.messages = CONVERSATION[:-1]
    "".join(session.reply(CONVERSATION[-1]["content"]))
    return model.prompts[-1]


def server_ids(path: str, body: dict) -> list[int]:
    model = Recorder()
    with BackgroundServer(model, get_tokenizer(), model_name="m") as srv:
        r = httpx.post(srv.url + path, json={"model": "m", "max_tokens": 1, "temperature": 0, **body}, timeout=30)
        assert r.status_code == 200, r.text
    return model.prompts[-1]


def qa_ids() -> list[int]:
    model = Recorder()
    qa_accuracy(model, [Document(messages=(*CONVERSATION, ANSWER))])
    return model.prompts[-1]  # the last question's prompt: the whole conversation before it


def sft_row(tmp_path) -> list[int]:
    """The first padded row SFT trains on, from a dataset holding the answered conversation."""
    records = tmp_path / "chats.jsonl"
    records.write_text(json.dumps({"text": [*CONVERSATION, ANSWER]}) + "\n")
    prepare(resolve_sources([str(records)]), tmp_path / "data", PrepareOptions(val_fraction=0, progress=False))
    loader = TokenLoader(tmp_path / "data", "train", 1, 128, mode="padded", sequential=True, loss_on="assistant")
    return loader.next_batch().inputs[0].tolist()


def sample_ids(monkeypatch) -> list[int]:
    model = Recorder()
    monkeypatch.setattr("tinyllm.runtime.checkpoint.load_model", lambda path, device: (model, None, path))
    args = argparse.Namespace(run="run", checkpoint=None, prompt=TEXT, max_new_tokens=1, temperature=0,
                              top_k=0, top_p=None, seed=None, device="cpu")
    assert sample.run(args) == 0
    return model.prompts[-1]


def test_a_conversation_gets_the_same_ids_on_every_surface(tmp_path, hf_tok):
    tok = get_tokenizer()
    want = tok.prompt_ids(messages=CONVERSATION)
    assert want[0] == EOT and tok.decode(want[1:]) == "".join(
        f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CONVERSATION) + "<|im_start|>assistant\n"
    surfaces = {
        "chat": chat_session_ids(),
        "serve": server_ids("/v1/chat/completions", {"messages": CONVERSATION}),
        "eval qa": qa_ids(),
        "sft row": sft_row(tmp_path)[: len(want)],  # the row goes on with the answer it learns
        "hf apply_chat_template": list(hf_tok.apply_chat_template(CONVERSATION, add_generation_prompt=True,
                                                                   return_dict=False)),
    }
    assert {name: ids for name, ids in surfaces.items() if ids != want} == {}


def test_a_text_gets_the_same_ids_on_every_surface(monkeypatch, hf_tok):
    want = get_tokenizer().prompt_ids(TEXT)
    assert want == [EOT, *get_tokenizer().encode(TEXT)]
    surfaces = {
        "sample": sample_ids(monkeypatch),
        "serve": server_ids("/v1/completions", {"prompt": TEXT}),
        "hf tokenizer": hf_tok(TEXT)["input_ids"],
    }
    assert {name: ids for name, ids in surfaces.items() if ids != want} == {}
