"""Rows of the batch decoder give each request the tokens `generate` gives it alone."""

from __future__ import annotations

import warnings

import pytest
import torch

from tinyllm.errors import UserError
from tinyllm.inference import generate
from tinyllm.inference.batch import BatchDecoder
from tinyllm.inference.layout import pack_head
from tinyllm.model import GPT, GPTConfig

# block_size 24 is short enough that the long rows below run past it (RoPE: the window is cut).
TINY = dict(vocab_size=250, block_size=24, n_layer=2, n_head=2, n_embd=32, tie_embeddings=False)

PROMPTS = {"a": [1, 2, 3], "b": [5] * 9, "c": [7, 8, 9, 10, 11], "d": list(range(20, 40))}
JOIN_AT = {"b": 3, "c": 5, "d": 6}  # step before which each joins; "a" starts alone
LEAVE_AT = {"c": 10}  # cancelled before this step
MAX_NEW = 30


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # sharpened, so greedy decoding is not decided by float noise
        model.head_weight.mul_(20)
    return model


def run_batched(model: GPT, params: dict[str, dict]) -> dict[str, list[int]]:
    """Requests join and leave between steps as JOIN_AT and LEAVE_AT say; each row's tokens."""
    dec = BatchDecoder(model)
    got: dict[str, list[int]] = {k: [] for k in PROMPTS}

    def keep(key: str, token: int | None) -> None:
        if token is not None:
            got[key].append(token)
        if token is None or len(got[key]) >= MAX_NEW:
            dec.remove(key)

    keep("a", dec.add("a", PROMPTS["a"], **params["a"]))
    for step in range(3 * MAX_NEW):
        for key in [k for k, at in JOIN_AT.items() if at == step]:
            keep(key, dec.add(key, PROMPTS[key], **params[key]))
        for key in [k for k, at in LEAVE_AT.items() if at == step]:
            dec.remove(key)
        for key, token in dec.step().items():
            keep(key, token)
        if not len(dec):
            break
    return got


def alone(model: GPT, key: str, params: dict) -> list[int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # learned positions warn where the context ends
        return list(generate(model, PROMPTS[key], MAX_NEW, **params))


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_greedy_rows_equal_their_requests_alone_as_others_join_and_leave(pos_emb):
    model = tiny(pos_emb=pos_emb)
    greedy = {k: dict(temperature=0) for k in PROMPTS}
    got = run_batched(model, greedy)
    for key in PROMPTS:
        want = alone(model, key, greedy[key])
        if key in LEAVE_AT:  # cancelled mid-way: what it got so far
            assert len(got[key]) == LEAVE_AT[key] - JOIN_AT[key] + 1
            want = want[: len(got[key])]
        assert got[key] == want, key  # exact (fp32)
    if pos_emb == "rope":  # the long rows ran past the context, so their windows were cut
        assert len(got["a"]) == len(got["d"]) == MAX_NEW


def test_each_row_samples_with_its_own_params():
    model = tiny(pos_emb="rope")
    params = {
        "a": dict(temperature=0.9, top_p=0.8, seed=1),
        "b": dict(temperature=1.3, top_k=20, seed=2),
        "c": dict(temperature=0),
        "d": dict(temperature=0.7, seed=4, logit_bias={9: 3.0}),
    }
    got = run_batched(model, params)
    for key in ("a", "b", "d"):
        assert got[key] == alone(model, key, params[key]), key
    # A stop id ends its row only: its tokens are those before it.
    stop = alone(model, "b", params["b"])[4]
    params["b"] = {**params["b"], "stop_ids": {stop}}
    got = run_batched(model, params)
    want = alone(model, "b", params["b"])
    assert got["b"] == want and len(want) < MAX_NEW
    assert got["a"] == alone(model, "a", params["a"])


@pytest.mark.parametrize("packed", [False, True])
def test_rows_that_sample_alike_draw_together_each_from_its_own_seed(packed):
    model = tiny(pos_emb="rope")
    if packed:  # as the server's worker runs it: batches through oneDNN's packed head
        pack_head(model)
    params = {k: dict(temperature=0.9, top_k=50, seed=i) for i, k in enumerate(("a", "b", "d"))}
    params["c"] = dict(temperature=0)
    got = run_batched(model, params)
    for key in ("a", "b", "d"):
        assert got[key] == alone(model, key, params[key]), key


def test_a_bad_request_is_refused_before_any_forward():
    dec = BatchDecoder(tiny())
    dec.add("ok", [1, 2], temperature=0)
    for bad in (dict(prompt_ids=[]), dict(prompt_ids=[250]), dict(logit_bias={999: 1.0}),
                dict(top_p=0.0)):
        with pytest.raises(UserError):
            dec.add("bad", **{"prompt_ids": [1], **bad})
    assert len(dec) == 1 and "bad" not in dec
    assert set(dec.step()) == {"ok"}
