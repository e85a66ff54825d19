"""TokenLoader: batch shapes, targets and masks; mixture; exact resume; disjoint ranks; errors."""

from __future__ import annotations

import json
import math
import re
import zlib

import numpy as np
import pytest
import torch

from tinyllm.data import loader as loader_module
from tinyllm.data.document import Document
from tinyllm.data.loader import TokenLoader
from tinyllm.errors import UserError
from tinyllm.tokenizer import EOT, IM_START, PAD, get_tokenizer

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


def test_padded_rows_are_endoftext_and_a_document_with_pad_and_no_loss_after_them(tmp_path, quiet_prepare):
    tok = get_tokenizer()
    docs = [Document(text="one two"), Document(text=" ".join(["word"] * 40)), Document(text="three four five six")]
    m = quiet_prepare([ListSource("toy", docs)], tmp_path, val_fraction=0)
    ids = shard_docs(tmp_path, m, "toy", "train")
    b = TokenLoader(tmp_path, "train", batch_size=3, context=T, mode="padded", sequential=True).next_batch()
    assert b.inputs.shape == b.targets.shape == (3, T)  # the long document is cut to fit the context
    for r, doc in enumerate(ids):
        # A document follows <|endoftext|>, as in a packed stream and in every prompt.
        row = [EOT, *doc][: T + 1]
        n = len(row) - 1
        assert b.inputs[r, :n].tolist() == row[:-1] and b.targets[r, :n].tolist() == row[1:]
        assert (b.inputs[r, n:] == PAD).all() and (b.targets[r, n:] == -1).all()
    assert b.inputs[0, :3].tolist() == get_tokenizer().prompt_ids("one two") and b.inputs[0, 3] == PAD
    assert tok.decode(b.targets[0, :3].tolist()) == "one two<|endoftext|>"  # the model learns to end


def test_padded_batches_are_a_multiple_of_the_width_bucket_wide(tmp_path, quiet_prepare, monkeypatch):
    """A batch's width is its longest row rounded up to WIDTH_BUCKET, at most the context: a few
    shapes in all, not one per batch (each new shape costs oneDNN a bf16 kernel build)."""
    docs = [Document(text=" ".join(["word"] * n)) for n in (2, 9, 17, 30, 5, 12)]
    m = quiet_prepare([ListSource("toy", docs)], tmp_path, val_fraction=0)
    ids = shard_docs(tmp_path, m, "toy", "train")
    monkeypatch.setattr(loader_module, "WIDTH_BUCKET", 8)
    loader = TokenLoader(tmp_path, "train", batch_size=1, context=24, mode="padded", sequential=True)
    for doc in ids:
        b = loader.next_batch()
        n = min(len(doc), 24)  # (input, target) pairs of <|endoftext|> + the document, cut to the context
        assert b.inputs.shape[1] == min(24, -(-n // 8) * 8)
        assert b.inputs[0, :n].tolist() == [EOT, *doc][:n] and (b.targets[0, n:] == -1).all()


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


def test_an_empty_train_split_asks_for_a_smaller_val_fraction(tmp_path, quiet_prepare):
    # One document, and the early val bar (25%) sent it to val: a larger --val-fraction cannot help.
    docs = next([d] for d in make_docs(40) if _goes_to_val(d))
    quiet_prepare([ListSource("toy", docs)], tmp_path)
    with pytest.raises(UserError, match=r"train split of source toy has 0 tokens in 0 documents.*"
                       r"more data or a smaller --val-fraction$"):
        TokenLoader(tmp_path, "train", 1, T)


def _goes_to_val(doc: Document) -> bool:
    from tinyllm.data.ingest import EARLY_VAL_FRACTION, rendered_bytes, val_hash

    return val_hash(rendered_bytes(doc)) < EARLY_VAL_FRACTION


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


# -- loss on assistant tokens only (chat fine-tuning) ----------------------------------------------
TC = 40  # the chat rows' context: a padded row cut shorter would end before most answers


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """Short stories, two thirds of them followed by Q&A, in several shards (rows of TC tokens)."""
    from tinyllm.data.prepare import PrepareOptions, prepare

    from .test_prepare import chat_docs

    out = tmp_path_factory.mktemp("chat")
    m = prepare([ListSource("chat", chat_docs(120, max_words=12))], out, PrepareOptions(progress=False, shard_tokens=900, val_fraction=0))
    return out, m


def expected_rows(out, m, mode: str) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) of every row with an assistant target, in order, built from the shards."""
    from .test_prepare import shard_masks

    docs, masks = shard_docs(out, m, "chat", "train"), shard_masks(out, m, "chat", "train")
    if mode == "packed":
        tokens, mask = sum(docs, []), sum(masks, [])
        rows = [(tokens[k * TC : k * TC + TC + 1], mask[k * TC : k * TC + TC + 1]) for k in range((len(tokens) - 1) // TC)]
    else:
        rows = [([EOT, *d][: TC + 1], [False, *mk][: TC + 1]) for d, mk in zip(docs, masks, strict=True)]
    return [(r[:-1], [t if keep else -1 for t, keep in zip(r[1:], mk[1:], strict=True)])
            for r, mk in rows if any(mk[1:])]


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_assistant_targets_are_exactly_the_assistant_tokens(chat, mode):
    out, m = chat
    want = expected_rows(out, m, mode)
    loader = TokenLoader(out, "train", 4, TC, mode=mode, sequential=True, loss_on="assistant")
    assert loader.epoch_rows == len(want)
    if mode == "padded":  # stories without questions are left out
        assert len(want) < TokenLoader(out, "train", 4, TC, mode=mode, sequential=True).epoch_rows
    for step in range(len(want) // 4):
        b = loader.next_batch()
        for r in range(4):
            inputs, targets = want[step * 4 + r]
            n = len(inputs)
            assert b.inputs[r, :n].tolist() == inputs and b.targets[r, :n].tolist() == targets
            assert (b.targets[r, n:] == -1).all()
            assert (b.targets[r] != -1).any()  # every row, so every batch, has a target


def test_assistant_targets_decode_to_the_answers(chat):
    out, _ = chat
    tok = get_tokenizer()
    b = TokenLoader(out, "train", 8, 64, mode="padded", sequential=True, loss_on="assistant").next_batch()
    for row in b.targets:
        kept = tok.decode(t for t in row.tolist() if t != -1)
        assert re.fullmatch(r"(Answer \d+\.<\|im_end\|>)+", kept)


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_assistant_mode_resumes_exactly_across_epochs(chat, mode):
    out, _ = chat
    first = TokenLoader(out, "train", 3, TC, mode=mode, seed=9, loss_on="assistant")
    for _ in range(first.epoch_rows // 3 - 1):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    expected = [first.next_batch() for _ in range(4)]
    again = TokenLoader(out, "train", 3, TC, mode=mode, seed=9, loss_on="assistant")
    again.load_state_dict(state)
    for want in expected:
        got = again.next_batch()
        assert torch.equal(got.inputs, want.inputs) and torch.equal(got.targets, want.targets)
    with pytest.raises(UserError, match="loss_on 'assistant', this run has 'all'"):
        TokenLoader(out, "train", 3, TC, mode=mode, seed=9).load_state_dict(state)


def test_position_saved_before_loss_on_existed_means_all(chat):
    out, _ = chat
    loader = TokenLoader(out, "train", 2, TC, seed=1)
    loader.next_batch()
    state = loader.state_dict()
    del state["loss_on"]
    want = loader.next_batch()
    again = TokenLoader(out, "train", 2, TC, seed=1)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch().inputs, want.inputs)
    with pytest.raises(UserError, match="loss_on 'all'"):
        TokenLoader(out, "train", 2, TC, seed=1, loss_on="assistant").load_state_dict(state)


def test_default_mode_is_unchanged_by_the_mask(chat):
    out, m = chat
    tokens = np.concatenate([np.array(d) for d in shard_docs(out, m, "chat", "train")])
    b = TokenLoader(out, "train", 2, TC, sequential=True).next_batch()
    assert b.targets.tolist() == [tokens[1 : TC + 1].tolist(), tokens[TC + 1 : 2 * TC + 1].tolist()]


def test_alpaca_records_give_loss_only_on_the_output(tmp_path, quiet_prepare):
    from tinyllm.data.source_specs import resolve_sources

    rows = [{"instruction": f"Count to {i}.", "input": "" if i % 2 else "Use digits.",
             "output": " ".join(str(k) for k in range(1, i + 1)), "text": "ignored"} for i in range(1, 30)]
    (tmp_path / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    quiet_prepare(resolve_sources([f"alpaca={tmp_path / 'alpaca.jsonl'}"]), tmp_path / "data")
    tok = get_tokenizer()
    outputs = {r["output"] + "<|im_end|>" for r in rows}
    header = [IM_START, *tok.encode("assistant\n")]
    for mode in ("packed", "padded"):
        loader = TokenLoader(tmp_path / "data", "train", 4, 128, mode=mode, sequential=True, loss_on="assistant")
        for _ in range(3):
            b = loader.next_batch()
            for inputs, targets in zip(b.inputs.tolist(), b.targets.tolist(), strict=True):
                kept = [i for i, t in enumerate(targets) if t != -1]
                assert kept, "a row with no target"
                if mode == "padded":  # one record per row: the kept targets are its output, whole
                    assert tok.decode(targets[i] for i in kept) in outputs
                for i in kept:  # each answer's loss starts right after the assistant header
                    if i - 1 not in kept and i + 1 >= len(header):
                        assert inputs[i + 1 - len(header) : i + 1] == header


def test_source_without_chat_cannot_train_on_assistant_tokens(toy):
    out, _ = toy
    with pytest.raises(UserError, match="source toy has no assistant tokens.*fine-tune on chat data"):
        TokenLoader(out, "train", 2, T, loss_on="assistant")
    with pytest.raises(UserError, match="loss_on 'answers'"):
        TokenLoader(out, "train", 2, T, loss_on="answers")


def test_mixed_sources_skip_rows_of_the_plain_one(tmp_path, quiet_prepare):
    from .test_prepare import chat_docs

    quiet_prepare([ListSource("chat", chat_docs(30, max_words=12)), ListSource("plain", make_docs(30))], tmp_path, val_fraction=0)
    with pytest.raises(UserError, match="source plain has no assistant tokens"):
        TokenLoader(tmp_path, "train", 2, TC, mode="padded", loss_on="assistant")


def test_dataset_without_masks_asks_for_prepare_again(tmp_path, quiet_prepare):
    from .test_shards import as_version_1

    m = quiet_prepare([ListSource("toy", make_docs(40))], tmp_path)
    for split in m["sources"]["toy"]["splits"].values():
        for entry in split["shards"]:
            as_version_1(tmp_path / entry["file"])
            raw = (tmp_path / entry["file"]).read_bytes()
            entry["crc32"], entry["bytes"] = zlib.crc32(raw[32:]), len(raw)
    m["version"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    assert TokenLoader(tmp_path, "train", 2, T).next_batch().inputs.shape == (2, T)  # still loads
    with pytest.raises(UserError, match="older tinyllm.*run tinyllm prepare again"):
        TokenLoader(tmp_path, "train", 2, T, loss_on="assistant")


def test_val_sources_feed_only_val_and_train_sources_only_train(tmp_path, quiet_prepare, recwarn):
    # Two train sources (mixed by weight) and two held-out sets: no source is ever empty by mistake here.
    quiet_prepare([ListSource("a", make_docs(60, seed=1), split="train"), ListSource("b", make_docs(60, seed=2), split="train"),
                   ListSource("held", make_docs(12, seed=3), split="val"),
                   ListSource("held2", make_docs(5, seed=4), split="val")], tmp_path)
    train = TokenLoader(tmp_path, "train", 4, T)
    assert set(train.state_dict()["cursors"]) == {"a", "b"}
    for _ in range(20):
        train.next_batch()
    assert all(c > 0 for c in train.state_dict()["cursors"].values())
    val = TokenLoader(tmp_path, "val", 4, T, mode="padded")
    assert val.eval_rows() == {"held": 12, "held2": 5}  # every held-out document, nothing else
    assert {name for name, _ in val.eval_pass()} == {"held", "held2"}
    assert not [w for w in recwarn if "left out" in str(w.message)]  # by design, not worth a warning
