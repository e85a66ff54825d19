"""Bad input through the real CLI: each mistake is one line on stderr naming the thing and the fix,
exit status 2, no traceback, and nothing on disk changes (every file's bytes and mtime are
compared before and after; a run directory that did not exist is not created).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinyllm.data.shards import HEADER, MAGIC
from tinyllm.runtime.checkpoint import latest_checkpoint
from tinyllm.train.trainer import Trainer

from .conftest import TINY, assert_user_error, cli, snapshot, tiny_config

# -- prepared data ----------------------------------------------------------------------------


def train_shard(data: Path) -> Path:
    return next(data.glob("*-train-*.bin"))


def flip_a_token(data: Path) -> None:
    path = train_shard(data)
    raw = bytearray(path.read_bytes())
    raw[HEADER.size + 10] ^= 0x01
    path.write_bytes(bytes(raw))


def set_header(data: Path, *, version: int | None = None, vocab: int | None = None) -> None:
    for path in data.glob("*.bin"):
        raw = path.read_bytes()
        magic, v, voc, n, d = HEADER.unpack(raw[: HEADER.size])
        assert magic == MAGIC
        path.write_bytes(HEADER.pack(magic, version or v, vocab or voc, n, d) + raw[HEADER.size :])


def other_tokenizer(data: Path) -> None:
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer"] = {"name": "cl100k_base", "vocab_size": 100277}
    (data / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(("damage", "expected"), [
    (flip_a_token, ["-train-00000.bin is corrupt", "CRC-32 does not match", "run tinyllm prepare again"]),
    (lambda d: set_header(d, version=9), ["format version 9, this tinyllm reads versions 1 and 2"]),
    (other_tokenizer, ["was prepared with tokenizer 'cl100k_base'", "run tinyllm prepare again"]),
    (lambda d: set_header(d, vocab=50257), ["holds ids for a vocabulary of 50257, not 50260",
                                            "prepare the data again with this tokenizer"]),
], ids=["corrupt", "wrong-version", "other-tokenizer", "other-vocab"])
def test_damaged_dataset_is_refused_before_training(data_copy, tmp_path, damage, expected):
    damage(data_copy)
    before = snapshot(data_copy)
    run = tmp_path / "new-run"
    assert_user_error(cli("train", *TINY, "--data", str(data_copy), "--out", str(run), "--max-steps", "2"), *expected)
    assert not run.exists() and snapshot(data_copy) == before


def test_a_run_whose_dataset_was_damaged_is_left_as_it_was(data_copy, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(data_copy, max_steps=1), run, echo=False).run()
    path = train_shard(data_copy)
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    before = snapshot(run, data_copy)
    assert_user_error(cli("train", "--out", str(run), "--max-steps", "3"), "-train-00000.bin is corrupt (truncated")
    assert snapshot(run, data_copy) == before


# -- input files for prepare ------------------------------------------------------------------


@pytest.mark.parametrize(("content", "expected"), [
    ("Once upon a time".encode("utf-16"), "is not UTF-8 text (it holds NUL bytes"),
    (bytes(range(128, 256)) * 4, "is not UTF-8 text (512 of its 512 characters are not valid UTF-8"),
], ids=["utf-16", "binary"])
def test_unusable_input_file_is_refused(tmp_path, content, expected):
    src = tmp_path / "story.txt"
    src.write_bytes(content)
    out = tmp_path / "data"
    line = assert_user_error(cli("prepare", "--quiet", "--source", str(src), "--out", str(out)), expected)
    assert str(src) in line or "story" in line
    assert not out.exists()  # so running again once the file is fixed is not refused


def test_after_an_empty_file_is_fixed_prepare_runs_into_the_same_directory(tmp_path):
    src = tmp_path / "story.txt"
    src.write_bytes(b"")
    out = tmp_path / "data"
    assert_user_error(cli("prepare", "--quiet", "--source", str(src), "--out", str(out)),
                      "gave no documents (1 empty ones skipped)")
    assert not out.exists()
    src.write_text("Once upon a time there was a cat who sat on a mat.\n", encoding="utf-8")
    r = cli("prepare", "--quiet", "--source", str(src), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "manifest.json").is_file()


# -- config files -------------------------------------------------------------------------------


@pytest.mark.parametrize(("toml", "expected"), [
    ("[optim]\nlrr = 1e-3\n", ["bad.toml", "unknown key optim.lrr (did you mean optim.lr?)"]),
    ("[trian]\nmax_steps = 10\n", ["bad.toml", "unknown section 'trian'", "train"]),
    ('[train]\nmax_steps = "ten"\n', ["bad.toml", "train.max_steps must be an integer, got 'ten'"]),
    ("[model]\nn_layer = 0\n", ["model.n_layer must be a positive integer, got 0"]),
    ("[model]\nn_embd = 30\nn_head = 4\n", ["must be divisible by model.n_head (4)"]),
    ("[model]\nn_layer = 2\n[model\n", ["bad.toml is not valid TOML"]),
], ids=["typo-key", "typo-section", "wrong-type", "zero-layers", "heads-do-not-divide", "not-toml"])
def test_bad_config_file_is_one_line_naming_key_and_fix(run_copy, tmp_path, toml, expected):
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    before = snapshot(run_copy, config)
    assert_user_error(cli("train", "--out", str(run_copy), "--config", str(config)), *expected)
    assert snapshot(run_copy, config) == before


@pytest.mark.parametrize(("make", "expected"), [
    (Path.mkdir, "is a directory: name a .toml file"),
    (lambda p: p.write_text("[train]\nmax_steps = 10\n", encoding="utf-16"),
     "is not UTF-8 text (byte 0xff at offset 0): save it as UTF-8"),
], ids=["directory", "utf-16"])
def test_a_config_file_that_cannot_be_read_is_one_line(run_copy, tmp_path, make, expected):
    config = tmp_path / "bad.toml"
    make(config)
    before = snapshot(run_copy)
    assert_user_error(cli("train", "--out", str(run_copy), "--config", str(config)), f"config file {config} {expected}")
    assert snapshot(run_copy) == before


def test_an_out_that_cannot_be_written_is_one_line(data, tmp_path):
    (tmp_path / "file").write_text("")
    run = tmp_path / "file" / "run"  # a directory cannot be made inside a file (as root too)
    r = cli("train", *TINY, "--data", str(data), "--out", str(run), "--max-steps", "2")
    assert_user_error(r, f"cannot write {run} (Not a directory): pick another --out")
    assert (tmp_path / "file").read_text() == ""


def test_a_model_too_large_for_memory_is_a_one_line_error(data, tmp_path):
    run = tmp_path / "run"
    # 2**33 positions x 32 wide is a 1 TiB embedding table: refused by the allocator up front.
    r = cli("train", *TINY, "--data", str(data), "--out", str(run), "--set", "model.block_size=8589934592")
    assert_user_error(r, "does not fit in cpu memory", "make it smaller (model.n_layer, model.n_embd, model.block_size)")
    assert not run.exists()


# -- checkpoints --------------------------------------------------------------------------------


def test_resume_with_another_model_shape_is_refused(run_copy):
    before = snapshot(run_copy)
    r = cli("train", "--out", str(run_copy), "--resume", "--set", "model.n_embd=64", "--set", "model.n_layer=3")
    assert_user_error(r, "cannot continue", "model.n_layer (2 -> 3)", "model.n_embd (32 -> 64)", "pick a new --out")
    assert snapshot(run_copy) == before


def test_weights_of_another_shape_than_their_config_are_refused(run_copy):
    ckpt = latest_checkpoint(run_copy)
    config = ckpt / "config.toml"
    config.write_text(config.read_text().replace("n_embd = 32", "n_embd = 64"))
    before = snapshot(run_copy)
    r = cli("sample", "--run", str(run_copy), "--max-new-tokens", "2")
    assert_user_error(r, "model.safetensors does not fit this model's shape", "size mismatch")
    assert snapshot(run_copy) == before


def test_resume_from_a_missing_checkpoint(run_copy, tmp_path):
    r = cli("train", "--out", str(tmp_path / "other"), "--resume", str(tmp_path / "nope" / "step-00000009"))
    assert_user_error(r, "no such run or checkpoint directory")
    assert not (tmp_path / "other").exists()


def test_resume_from_a_corrupt_checkpoint_names_the_file(run_copy):
    path = latest_checkpoint(run_copy) / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = snapshot(run_copy)
    r = cli("train", "--out", str(run_copy), "--resume", "--max-steps", "4")
    line = assert_user_error(r, "not a complete safetensors file", "use another checkpoint",
                             f"--resume {run_copy / 'checkpoints'}/step-N")
    assert str(path) in line
    assert snapshot(run_copy) == before


def test_a_corrupt_checkpoint_read_by_sample_names_the_flag_sample_takes(run_copy):
    path = latest_checkpoint(run_copy) / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    r = cli("sample", "--run", str(run_copy), "--max-new-tokens", "2")
    # sample has no --resume: the way to another checkpoint is --checkpoint.
    assert_user_error(r, "not a complete safetensors file", f"--checkpoint {run_copy / 'checkpoints'}/step-N")


def test_an_older_checkpoint_can_be_resumed_when_the_newest_is_corrupt(run_copy):
    """What the message above suggests works: --resume names the older checkpoint."""
    newest = latest_checkpoint(run_copy)
    (newest / "model.safetensors").write_bytes(b"\0" * 100)
    older = run_copy / "checkpoints" / "step-00000001"
    r = cli("train", "--out", str(run_copy), "--resume", str(older), "--max-steps", "3")
    assert r.returncode == 0, r.stderr
    assert "resuming at step 1" in r.stdout
    assert latest_checkpoint(run_copy).name == "step-00000003"
