"""`tinyllm tokenize` as a user runs it: a real subprocess, stdout and exit codes."""

import json
import subprocess
import sys


def tinyllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinyllm", *args], capture_output=True, text=True)


def test_tokenize_prints_gpt2_ids():
    r = tinyllm("tokenize", "Hello world")
    assert r.returncode == 0 and r.stdout.strip() == "[15496, 995]"


def test_decode_prints_text():
    r = tinyllm("tokenize", "--decode", "[15496, 995]")
    assert r.returncode == 0 and r.stdout == "Hello world\n"


def test_chat_file_prints_ids_and_mask(tmp_path):
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(convo))
    r = tinyllm("tokenize", "--chat", str(path))
    out = json.loads(r.stdout)
    assert r.returncode == 0 and len(out["ids"]) == len(out["mask"])
    assert sum(out["mask"]) == 3  # "Hello", ".", <|im_end|>


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    for args, words in [
        (["--decode", "[50260]"], "out of range"),
        (["--decode", "not json"], "JSON list"),
        (["--chat", str(tmp_path / "missing.json")], "no such file"),
        (["--chat", str(tmp_path)], f"--chat {tmp_path} is a directory: name a JSON file of messages"),
    ]:
        r = tinyllm("tokenize", *args)
        assert r.returncode == 2, args
        assert words in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    bad_role = tmp_path / "bad.json"
    bad_role.write_text(json.dumps([{"role": "robot", "content": "x"}]))
    r = tinyllm("tokenize", "--chat", str(bad_role))
    assert r.returncode == 2 and f"error: --chat {bad_role}: message 0 has role 'robot'" in r.stderr


def test_flags_that_would_be_ignored_are_refused(tmp_path):
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"role": "user", "content": "Hi"}]))
    for args, words in [
        (["Hello", "--decode", "[15496]"], "give TEXT or --decode, not both"),
        (["Hello", "--chat", str(chat)], "give TEXT or --chat, not both"),
        (["Hello", "--generation-prompt"], "--generation-prompt only applies to --chat"),
    ]:
        r = tinyllm("tokenize", *args)
        assert r.returncode == 2 and r.stdout == "", args
        assert words in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_help_documents_every_flag():
    r = tinyllm("tokenize", "--help")
    for flag in ["--decode", "--chat", "--generation-prompt"]:
        assert flag in r.stdout
