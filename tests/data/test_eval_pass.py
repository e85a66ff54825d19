"""TokenLoader.eval_pass: every row of every source exactly once, whatever the sources' sizes and
weights; a budgeted subset shared by size, never repeating a row, the same every time."""

from __future__ import annotations

import pytest

from tinyllm.data.loader import TokenLoader
from tinyllm.tokenizer import EOT

from .conftest import ListSource, make_docs
from .test_prepare import shard_docs

T = 16


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    """A small source weighted 3 beside one thirty times larger weighted 1 (the seed recipe's shape)."""
    from tinyllm.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("mix")
    sources = [ListSource("small", make_docs(10, seed=1), weight=3.0), ListSource("big", make_docs(300, seed=2))]
    m = prepare(sources, out, PrepareOptions(progress=False, shard_tokens=900, val_fraction=0))
    return out, m


def expected_rows(out, m, name: str, mode: str) -> list[list[int]]:
    """Every row of one source's train split, in order, built from its shards: each row's inputs."""
    docs = shard_docs(out, m, name, "train")
    if mode == "padded":
        return [[EOT, *d][: T + 1][:-1] for d in docs]  # a padded row: <|endoftext|>, the document
    stream = sum(docs, [])
    return [stream[k * T : k * T + T] for k in range((len(stream) - 1) // T)]


def rows_by_source(loader: TokenLoader, max_rows: int | None = None) -> dict[str, list[list[int]]]:
    seen: dict[str, list[list[int]]] = {}
    for name, batch in loader.eval_pass(max_rows):
        assert len(batch.inputs) <= loader.batch_size
        for x, y in zip(batch.inputs, batch.targets, strict=True):
            n = int((y != -1).sum())  # padded rows: the pad tail is no input of the document
            seen.setdefault(name, []).append(x[:n].tolist())
    return seen


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_a_pass_visits_every_row_of_every_source_once(mix, mode):
    out, m = mix
    loader = TokenLoader(out, "train", 4, T, mode=mode, sequential=True)
    seen = rows_by_source(loader)
    want = {name: expected_rows(out, m, name, mode) for name in ("small", "big")}
    assert len(want["small"]) % 4 and len(want["big"]) > 20 * len(want["small"])  # short last batches; sizes far apart
    assert seen == want  # in order, each once, and no batch mixes the two
    assert sum(map(len, seen.values())) == loader.epoch_rows


def test_a_budget_is_shared_by_size_without_repeats_and_is_the_same_each_time(mix):
    out, m = mix
    loader = TokenLoader(out, "train", 4, T)
    sizes = {name: len(expected_rows(out, m, name, "packed")) for name in ("small", "big")}
    budget = 40
    plan = loader.eval_rows(budget)
    assert sum(plan.values()) == budget
    for name, n in plan.items():  # each source's share of the budget is its share of the rows
        assert abs(n - budget * sizes[name] / sum(sizes.values())) < 1
    seen = rows_by_source(loader, budget)
    full = rows_by_source(loader)
    for name, rows in seen.items():
        assert rows == full[name][: plan[name]]  # the first rows of the source, none twice
    loader.next_batch()  # training position and seed play no part
    assert rows_by_source(TokenLoader(out, "train", 4, T, seed=9), budget) == seen == rows_by_source(loader, budget)
    assert loader.eval_rows(10**9) == sizes


def test_a_share_that_rounds_to_nothing_leaves_the_source_out(mix):
    out, _ = mix
    loader = TokenLoader(out, "train", 4, T)
    plan = loader.eval_rows(3)
    assert plan["small"] == 0 and plan["big"] == 3
    assert [name for name, _ in loader.eval_pass(3)] == ["big"]
