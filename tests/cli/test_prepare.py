"""`tinyllm prepare` as a user runs it: a real subprocess, its output, files and exit codes."""

import json
import subprocess
import sys

import pytest

from tinyllm.cli import build_parser, main


def tinyllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinyllm", *args], capture_output=True, text=True)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinyllm prepare: error: "), r.stderr
    return lines[0]


def test_every_flag_is_documented():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for action in sub.choices["prepare"]._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_list_sources_names_every_source():
    r = tinyllm("prepare", "--list-sources")
    assert r.returncode == 0
    for name in ("builtin", "python-docs", "wikipedia", "simplestories", "fineweb-edu", "openwebtext2", "alpaca",
                 "reddit-instruct"):
        assert f"\n{name} " in r.stdout
    assert "Python Software Foundation License" in r.stdout and "--val-source" in r.stdout


def test_prepare_local_files_writes_a_manifest(tmp_path):
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(json.dumps({"body": f"Note {i}: the cat sat on the mat."}) + "\n" for i in range(30)))
    r = tinyllm("prepare", "--source", f"{data}:2", "--field", "body", "--out", str(tmp_path / "ds"), "--quiet")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    entry = manifest["sources"]["local-notes"]
    assert entry["weight"] == 2.0
    assert entry["splits"]["train"]["documents"] + entry["splits"]["val"]["documents"] == 30
    assert "local-notes (weight 2)" in r.stdout and "manifest.json" in r.stdout


def test_prepare_builtin_with_a_cap(tmp_path):
    r = tinyllm("prepare", "--max-tokens", "3000", "--out", str(tmp_path / "ds"), "--quiet")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert 3000 <= sum(s["tokens"] for s in manifest["splits"].values()) < 3500
    assert 0 < manifest["floor"] < 5 and "floor" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--source", "missing.txt", "--out", "DS"], "no such file, folder or source name 'missing.txt'"),
    (["--source", "builtin:-1", "--out", "DS"], "weight -1 must be a positive number"),
    (["--val-fraction", "1.5", "--out", "DS"], "--val-fraction 1.5"),
    ([], "give --out DIR"),
    # A mistyped flag is named as one, not taken for paths from an unquoted glob.
    (["--output", "DS", "--quiet"], "unrecognized arguments: --output (tinyllm prepare --help lists the flags)"),
])
def test_bad_flags_are_one_line_errors(tmp_path, args, message):
    args = [str(tmp_path / "ds") if a == "DS" else a for a in args]
    assert message in one_line_error(tinyllm("prepare", *args))


def test_missing_field_is_a_one_line_error(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"content": "hello"}) + "\n")
    line = one_line_error(tinyllm("prepare", "--source", str(data), "--out", str(tmp_path / "ds"), "--quiet"))
    assert "rows.jsonl line 1 has no field 'text'" in line


def test_second_run_with_other_sources_is_refused(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("Alpha text for the first run.")
    b.write_text("Beta text for another dataset.")
    out = str(tmp_path / "ds")
    assert tinyllm("prepare", "--source", str(a), "--out", out, "--quiet").returncode == 0
    line = one_line_error(tinyllm("prepare", "--source", str(b), "--out", out, "--quiet"))
    assert "already holds data prepared from other sources" in line


def test_an_unquoted_glob_says_to_quote_it(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (notes / name).write_text(f"Note {name}: the cat sat on the mat.")
    # What a shell passes for --source notes/*.txt
    expanded = sorted(str(p) for p in notes.glob("*.txt"))
    line = one_line_error(tinyllm("prepare", "--source", *expanded, "--out", str(tmp_path / "ds"), "--quiet"))
    assert f"unexpected {expanded[1]} {expanded[2]}" in line and "--source 'notes/*.txt'" in line
    assert not (tmp_path / "ds").exists()
    # Two unquoted globs: the second's extra paths are named as well, not a bare argparse error.
    line = one_line_error(tinyllm("prepare", "--source", *expanded, "--source", *expanded, "--out",
                                  str(tmp_path / "ds"), "--quiet"))
    assert f"unexpected {expanded[1]} {expanded[2]} {expanded[1]} {expanded[2]}" in line
    quoted = tinyllm("prepare", "--source", str(notes / "*.txt"), "--out", str(tmp_path / "ds"), "--quiet")
    assert quoted.returncode == 0, quoted.stderr
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert len(manifest["sources"]) == 1
    assert sum(s["documents"] for s in manifest["splits"].values()) == 3


def test_a_redirected_log_gets_the_summary_and_no_bar_redraws(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("".join(f"Note {i}: the cat sat on the mat.\n\n" for i in range(50)))
    log = tmp_path / "prepare.log"
    with open(log, "w") as f:  # as nohup, SLURM and CI keep it: stdout and stderr in one file
        r = subprocess.run([sys.executable, "-m", "tinyllm", "prepare", "--source", str(notes),
                            "--out", str(tmp_path / "ds")], stdout=f, stderr=subprocess.STDOUT)
    text = log.read_bytes().decode()  # bytes as written: reading text would turn each \r into \n
    assert r.returncode == 0, text
    assert "\r" not in text
    assert "notes (weight 1): train " in text


def write_notes(path, n: int, word: str) -> list[str]:
    texts = [f"{word} note {i}: the cat sat on the mat and looked at the {word} sky." for i in range(n)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


def test_val_source_trains_on_every_train_document_and_validates_on_the_val_files(tmp_path, capsys):
    train = write_notes(tmp_path / "train.jsonl", 120, "blue")
    val = write_notes(tmp_path / "held.jsonl", 15, "green")
    ds, run = tmp_path / "ds", tmp_path / "run"
    r = tinyllm("prepare", "--source", str(tmp_path / "train.jsonl"), "--val-source", str(tmp_path / "held.jsonl"),
                "--out", str(ds), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "local-train (weight 1): train 120 docs" in r.stdout and "local-held (--val-source): val 15 docs" in r.stdout
    from tinyllm.data.shards import Shard
    from tinyllm.tokenizer import VOCAB_SIZE, get_tokenizer

    manifest = json.loads((ds / "manifest.json").read_text())
    tok = get_tokenizer()

    def texts(name: str, split: str) -> list[str]:
        shards = [Shard(ds / e["file"], VOCAB_SIZE) for e in manifest["sources"][name]["splits"][split]["shards"]]
        return [tok.decode(s.document(i)[:-1].tolist()) for s in shards for i in range(s.n_docs)]

    assert texts("local-train", "train") == train and texts("local-train", "val") == []
    assert texts("local-held", "val") == val and texts("local-held", "train") == []
    # A tiny run trains on it and evaluates on the held-out file only, end to end (in this process:
    # three more interpreters importing torch would triple the test's time).
    assert main(["train", "--preset", "tiny", "--data", str(ds), "--out", str(run), "--max-steps", "4",
                 "--sample-every", "0", "--eval-every", "2"]) == 0
    assert "val loss" in (run / "train_output.txt").read_text()
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["sources"]) == ["local-held"] and 0 < report["loss"] < 11
    held_tokens = manifest["sources"]["local-held"]["splits"]["val"]["tokens"]
    assert report["tokens"] == (held_tokens - 1) // 32 * 32  # every packed window of the val file, once
    assert main(["eval", "--run", str(run), "--split", "train", "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["sources"]) == ["local-train"]


@pytest.mark.parametrize("val, extra, message", [
    ("TRAIN", [], "train.jsonl is also read by --source"),
    ("HELD:2", [], "a val source takes no weight"),
    ("HELD", ["--val-fraction", "0.1"], "--val-fraction 0.1 and --val-source exclude each other"),
    ("EMPTY", [], "--val-source EMPTY gave no documents"),
])
def test_bad_val_sources_are_one_line_errors(tmp_path, val, extra, message):
    write_notes(tmp_path / "train.jsonl", 10, "blue")
    write_notes(tmp_path / "held.jsonl", 3, "green")
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    paths = {"TRAIN": "train.jsonl", "HELD": "held.jsonl", "EMPTY": "empty.jsonl"}
    spec = str(tmp_path / paths[val.split(":")[0]]) + val[len(val.split(":")[0]):]
    r = tinyllm("prepare", "--source", str(tmp_path / "train.jsonl"), "--val-source", spec, *extra,
                "--out", str(tmp_path / "ds"), "--quiet")
    assert message.replace("EMPTY", spec) in one_line_error(r)
    assert not (tmp_path / "ds").exists()


def test_an_out_below_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "notes.txt").write_text("The cat sat on the mat.")
    out = tmp_path / "notes.txt" / "ds"
    line = one_line_error(tinyllm("prepare", "--source", str(tmp_path / "notes.txt"), "--out", str(out), "--quiet"))
    assert f"--out {out}: a part of that path is a file" in line
