"""TokenLoader: batch shapes, targets and masks; mixture; exact resume; disjoint ranks; errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tinyllm.data.document import Document
from tinyllm.data.loader import TokenLoader
from tinyllm.errors import UserError
from tinyllm.tokenizer import PAD, get_tokenizer

from .conftest import ListSource, make_docs
from .test_prepare import shard_docs

T = 16


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """One source, several shards (so windows straddle shard boundaries)."""
    from tinyllm.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("toy")
    m = prepare([ListSource("toy", make_docs(200))], out, PrepareOptions(progress=False, shard_tokens=700))
    return out, m


def stream(out, m, split="train") -> np.ndarray:
    return np.concatenate([np.array(d) for d in shard_docs(out, m, "toy", split)])


def test_packed_rows_are_consecutive_windows_of_the_stream(toy):
    out, m = toy
    tokens = stream(out, m)
    loader = TokenLoader(out, "train", batch_size=4, context=T, sequential=True)
    for step in range(3):
        b = loader.next_batch()
        assert b.inputs.shape == b.targets.shape == (4, T)
        assert b.inputs.dtype == b.targets.dtype == torch.int64
        for r in range(4):
            k = step * 4 + r
            assert b.inputs[r].tolist() == tokens[k * T : k * T + T].tolist()
            assert b.targets[r].tolist() == tokens[k * T + 1 : k * T + T + 1].tolist()


def test_padded_rows_are_documents_with_pad_and_no_loss_after_them(tmp_path, quiet_prepare):
    tok = get_tokenizer()
    docs = [Document(text="one two"), Document(text=" ".join(["word"] * 40)), Document(text="three four five six")]
    m = quiet_prepare([ListSource("toy", docs)], tmp_path, val_fraction=0)
    ids = shard_docs(tmp_path, m, "toy", "train")
    b = TokenLoader(tmp_path, "train", batch_size=3, context=T, mode="padded", sequential=True).next_batch()
    assert b.inputs.shape == b.targets.shape == (3, T)  # the long document is cut to context + 1
    for r, doc in enumerate(ids):
        row = doc[: T + 1]
        n = len(row) - 1
        assert b.inputs[r, :n].tolist() == row[:-1] and b.targets[r, :n].tolist() == row[1:]
        assert (b.inputs[r, n:] == PAD).all() and (b.targets[r, n:] == -1).all()
    assert tok.decode(b.inputs[0, :2].tolist()) == "one two" and b.inputs[0, 2] == PAD
    assert tok.decode(b.targets[0, :2].tolist()) == " two<|endoftext|>"  # the model learns to end
    short = TokenLoader(tmp_path, "train", batch_size=1, context=T, mode="padded", sequential=True).next_batch()
    assert short.inputs.shape == (1, len(ids[0]) - 1)  # padded to the batch's longest row, not to T


def test_mixture_follows_the_weights(tmp_path, quiet_prepare):
    apples = [Document(text=" apple" * 30) for _ in range(20)]
    pears = [Document(text=" pear" * 30) for _ in range(20)]
    quiet_prepare([ListSource("apples", apples, weight=3), ListSource("pears", pears, weight=1)], tmp_path, val_fraction=0)
    apple_id = get_tokenizer().encode(" apple")[0]
    loader = TokenLoader(tmp_path, "train", batch_size=50, context=8, seed=7)
    rows = torch.cat([loader.next_batch().inputs for _ in range(40)])  # 2000 rows
    share = (rows[:, 1] == apple_id).float().mean().item()  # column 1 avoids a row starting at <|endoftext|>
    sd = math.sqrt(0.75 * 0.25 / len(rows))
    assert abs(share - 0.75) < 4 * sd
    seq = TokenLoader(tmp_path, "train", batch_size=8, context=8, sequential=True).next_batch()
    assert (seq.inputs[:, 1] == apple_id).sum().item() == 6  # weighted round-robin: exactly 3:1


def test_same_seed_same_batches_other_seed_other_batches(toy):
    out, _ = toy
    a, b, c = (TokenLoader(out, "train", 4, T, seed=s) for s in (1, 1, 2))
    xa, xb, xc = a.next_batch().inputs, b.next_batch().inputs, c.next_batch().inputs
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)


def test_sequential_ignores_the_seed(toy):
    out, _ = toy
    a = TokenLoader(out, "val", 2, T, seed=1, sequential=True).next_batch()
    b = TokenLoader(out, "val", 2, T, seed=99, sequential=True).next_batch()
    assert torch.equal(a.inputs, b.inputs)


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_restored_state_continues_exactly_across_epochs(toy, mode):
    out, _ = toy
    first = TokenLoader(out, "train", 8, T, mode=mode, seed=3)
    epoch_rows = first._sources[0].n_units
    for _ in range(epoch_rows // 8 - 1):  # stop just before the epoch ends
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    expected = [first.next_batch() for _ in range(4)]
    again = TokenLoader(out, "train", 8, T, mode=mode, seed=3)
    again.load_state_dict(state)
    for want in expected:
        got = again.next_batch()
        assert torch.equal(got.inputs, want.inputs) and torch.equal(got.targets, want.targets)


def test_an_epoch_visits_every_window_once(toy):
    out, _ = toy
    loader = TokenLoader(out, "train", 1, T, seed=5)
    n = loader._sources[0].n_units
    seen = {tuple(loader.next_batch().inputs[0].tolist()) for _ in range(n)}
    tokens = stream(out, toy[1])
    assert seen == {tuple(tokens[k * T : k * T + T].tolist()) for k in range(n)}


def test_ranks_see_disjoint_rows_that_cover_the_data(toy):
    out, _ = toy
    world = 2
    loaders = [TokenLoader(out, "train", 2, T, seed=4, rank=r, world_size=world) for r in range(world)]
    n = loaders[0]._sources[0].n_units
    steps = n // (2 * world)
    seen = [[tuple(row.tolist()) for _ in range(steps) for row in ld.next_batch().inputs] for ld in loaders]
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == steps * 2 * world


def test_split_too_small_for_one_row_names_dir_and_fix(tmp_path, quiet_prepare):
    quiet_prepare([ListSource("toy", [Document(text="tiny doc")] * 1)], tmp_path, val_fraction=0)
    with pytest.raises(UserError, match=rf"{tmp_path}.*train split of source toy has 3 tokens.*smaller context"):
        TokenLoader(tmp_path, "train", 1, T)
    with pytest.raises(UserError, match=r"val split of source toy has 0 tokens.*--val-fraction"):
        TokenLoader(tmp_path, "val", 1, T)


def test_missing_dataset_says_run_prepare(tmp_path):
    with pytest.raises(UserError, match="run tinyllm prepare"):
        TokenLoader(tmp_path / "nothing", "train", 1, T)
    tmp_path.joinpath("manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        TokenLoader(tmp_path, "train", 1, T)


def test_corrupt_shard_is_named_by_the_loader(tmp_path, quiet_prepare):
    m = quiet_prepare([ListSource("toy", make_docs(50))], tmp_path)
    name = m["sources"]["toy"]["splits"]["train"]["shards"][0]["file"]
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match=rf"shard .*{name}.*truncated"):
        TokenLoader(tmp_path, "train", 1, T)


def test_restoring_a_position_from_other_settings_is_refused(toy):
    out, _ = toy
    state = TokenLoader(out, "train", 2, T).state_dict()
    with pytest.raises(UserError, match="context 16.*32"):
        TokenLoader(out, "train", 2, 32).load_state_dict(state)


@pytest.mark.parametrize("kwargs, message", [
    ({"split": "test"}, "split 'test'"), ({"mode": "ragged"}, "mode 'ragged'"),
    ({"rank": 2, "world_size": 2}, "rank 2"), ({"batch_size": 0}, "batch size"),
])
def test_bad_arguments_are_user_errors(toy, kwargs, message):
    out, _ = toy
    args = {"split": "train", "batch_size": 2, "context": T} | kwargs
    with pytest.raises(UserError, match=message):
        TokenLoader(out, args.pop("split"), args.pop("batch_size"), args.pop("context"), **args)
