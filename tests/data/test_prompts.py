"""Default sample prompts: the openings of a dataset's first val documents, sources taking turns,
cut at a sentence or word end, chat markup never part of one."""

from __future__ import annotations

import numpy as np

from tinyllm.data.document import Document
from tinyllm.data.prompts import opening, opening_prompts
from tinyllm.tokenizer import EOT, get_tokenizer

from .conftest import ListSource
from .test_prepare import shard_docs

PLAY = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\n"
    "You are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.",
    "MENENIUS:\nWhat work's, my countrymen, in hand? where go you\nWith bats and clubs? The matter? speak, I pray you.",
]


def ids(text: str) -> np.ndarray:
    return np.array([*get_tokenizer().encode(text), EOT])


def test_an_opening_ends_at_a_sentence_or_word_and_leaves_the_rest_to_write():
    decode = get_tokenizer().decode
    story = "One day, there was a big girl named Kate. Kate had a white rock. Soon, Kate said, \"This is fun!\" " * 3
    assert opening(ids(story), decode, 32) == story[: story.index("!") + 2]  # the last sentence end in 32 tokens
    assert opening(ids(PLAY[0]), decode, 32).startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
    words = "the cat sat on the mat and looked at the dog for a long time without a word " * 3
    cut = opening(ids(words), decode, 10)
    assert words.startswith(cut) and words[len(cut)] == " "  # never mid-word
    assert opening(ids("Hello there, friend."), decode, 32) == "Hello"  # half of a short document at most


def test_a_chat_gives_only_the_text_before_it():
    tok = get_tokenizer()
    chat = tok.render_chat([{"role": "user", "content": "Who had the rock?"}, {"role": "assistant", "content": "Kate."}])
    story = tok.encode("Kate had a white rock. She took it to the park and left it by the big tree. ")
    assert opening(np.array([*story, *chat.ids, EOT]), tok.decode, 32) == "Kate had a white rock."
    assert opening(np.array([*chat.ids, EOT]), tok.decode, 32) == ""


def test_prompts_are_openings_of_the_first_val_documents_of_each_source_in_turn(tmp_path, quiet_prepare):
    play = [Document(text=f"SCENE {i}.\n{PLAY[i % 2]}") for i in range(16)]
    chats = [Document(text="", messages=({"role": "user", "content": f"Question {i}?"},
                                         {"role": "assistant", "content": "Yes."})) for i in range(16)]
    m = quiet_prepare([ListSource("play", play), ListSource("chat", chats)], tmp_path, val_fraction=0.5)
    prompts = opening_prompts(tmp_path, n=3)
    decode = get_tokenizer().decode
    val = shard_docs(tmp_path, m, "play", "val")
    want = list(dict.fromkeys(opening(np.array(d), decode, 32) for d in val))
    assert prompts == want[:3] and prompts  # distinct, from the play only: a chat has no opening
    assert all(p.startswith("SCENE ") for p in prompts)
