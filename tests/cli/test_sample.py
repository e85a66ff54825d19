"""`tinyllm sample`: text from a trained run, repeatable with a seed, clear errors without one."""

import argparse
import subprocess
import sys

import pytest

from tinyllm.cli import sample
from tinyllm.config import resolve
from tinyllm.data.dataset import default_builtin_dataset
from tinyllm.inference.sampling import generate
from tinyllm.runtime.checkpoint import load_model
from tinyllm.tokenizer import SPECIAL_TOKENS, STOP_IDS, get_tokenizer
from tinyllm.train.trainer import Trainer


def tinyllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinyllm", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = default_builtin_dataset(max_tokens=40_000, cache_dir=tmp_path_factory.mktemp("cache"))
    cfg = resolve("tiny", overrides=[("data.dir", str(data), "test"), ("train.max_steps", 3, "test"),
                                     ("train.eval_every", 0, "test"), ("train.sample_every", 0, "test")])
    out = tmp_path_factory.mktemp("run")
    Trainer(cfg, out, echo=False).run()
    return out


def expected(path, prompt: str, n: int, **sampling) -> str:
    model, _, _ = load_model(path)
    tok = get_tokenizer()
    ids = generate(model, tok.prompt_ids(prompt), n, stop_ids=STOP_IDS, **sampling)
    return prompt + tok.decode_text(ids) + "\n"


def test_sample_streams_the_models_greedy_continuation(run):
    r = tinyllm("sample", "--run", str(run), "--prompt", "Once upon a time", "--max-new-tokens", "8",
                "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected(run, "Once upon a time", 8, temperature=0)
    assert len(r.stdout.strip()) > len("Once upon a time")


def test_seeded_sample_from_a_chosen_checkpoint_repeats(run):
    checkpoint = run / "checkpoints" / "step-00000003"
    r = tinyllm("sample", "--checkpoint", str(checkpoint), "--max-new-tokens", "6", "--temperature", "1",
                "--top-k", "0", "--seed", "7")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected(checkpoint, "", 6, temperature=1, top_k=None, seed=7)


def test_run_without_checkpoint_is_a_clear_error(tmp_path):
    r = tinyllm("sample", "--run", str(tmp_path))
    assert r.returncode == 2 and "has no checkpoint yet" in r.stderr and "Traceback" not in r.stderr
    r = tinyllm("sample")
    assert r.returncode == 2 and "give --run RUN_DIR" in r.stderr


def test_a_seed_out_of_range_is_a_one_line_error(run):
    r = tinyllm("sample", "--run", str(run), "--max-new-tokens", "2", "--seed", str(2**64))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == f"tinyllm sample: error: seed must be an integer from {-2**63} to {2**64 - 1}, got {2**64}"


@pytest.mark.parametrize("special", sorted(SPECIAL_TOKENS.values()))
def test_a_special_token_ends_the_sample_and_is_never_printed(monkeypatch, capsys, preferring, special):
    """The model writes a special id ~0.3 of the time (after a story, <|im_start|> opens the chat
    about it): the sample ends there and prints only text."""
    model = preferring(special)
    monkeypatch.setattr("tinyllm.runtime.checkpoint.load_model", lambda path, device: (model, None, path))
    for seed in range(3):
        args = argparse.Namespace(run="run", checkpoint=None, prompt="Hi", max_new_tokens=60, temperature=1.0,
                                  top_k=0, top_p=None, seed=seed, device="cpu")
        assert sample.run(args) == 0
        out = capsys.readouterr().out
        assert out.startswith("Hi") and not any(name in out for name in SPECIAL_TOKENS), out
        assert len(get_tokenizer().encode(out)) < 60


def test_a_prompt_that_fills_the_context_leaves_room_for_the_continuation(run, capsys):
    # With learned positions generation ends with the context: a prompt that filled it got 1 token.
    model, cfg, _ = load_model(run)
    prompt = "The cat sat on the mat and looked at the dog. " * 8  # 97 tokens, context 32
    args = argparse.Namespace(run=str(run), checkpoint=None, prompt=prompt, max_new_tokens=10, temperature=0,
                              top_k=0, top_p=None, seed=None, device="cpu")
    assert sample.run(args) == 0
    out, err = capsys.readouterr()
    tok = get_tokenizer()
    kept = tok.prompt_ids(prompt)[-(cfg.model.block_size - 10):]
    no_stop = {t: -100 for t in STOP_IDS}  # greedy continuations here may end at once; not this one
    assert out == prompt + tok.decode_text(generate(model, kept, 10, temperature=0, stop_ids=STOP_IDS)) + "\n"
    assert len(list(generate(model, kept, 10, temperature=0, logit_bias=no_stop))) == 10
    assert "keeping the prompt's last 22" in err


def test_ctrl_c_ends_the_line_so_the_interrupted_note_starts_its_own(monkeypatch, capsys):
    # `main` prints "tinyllm sample: interrupted" on stderr; it was glued to the text on a terminal.
    def interrupted(*args, **kwargs):
        yield " and then"
        raise KeyboardInterrupt

    monkeypatch.setattr("tinyllm.cli.sample.load_run", lambda args, verb: (None, None, None))
    monkeypatch.setattr(sample, "continuation", interrupted)
    args = argparse.Namespace(prompt="Once", max_new_tokens=10, temperature=1.0, top_k=0, top_p=None, seed=None)
    with pytest.raises(KeyboardInterrupt):
        sample.run(args)
    assert capsys.readouterr().out == "Once and then\n"
