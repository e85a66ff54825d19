"""The `tinyllm` entry point: what reaches the user when a command fails."""

import errno
import os
import subprocess
import sys

import pytest

import tinyllm.cli.tokenize
from tinyllm.cli import main


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_a_full_disk_or_a_denied_file_anywhere_is_one_line_naming_it(monkeypatch, capsys, code):
    def fails(*args):
        raise OSError(code, os.strerror(code), "/cache/tokenizer.json")

    monkeypatch.setattr(tinyllm.cli.tokenize, "get_tokenizer", fails)
    assert main(["tokenize", "Hello"]) == 2
    err = capsys.readouterr().err
    assert err == (f"tinyllm tokenize: error: /cache/tokenizer.json: {os.strerror(code)}: free disk space or fix its "
                   "permissions, then run the command again\n")


def test_any_other_os_error_is_a_bug_and_keeps_its_traceback(monkeypatch):
    def fails(*args):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/cache/tokenizer.json")

    monkeypatch.setattr(tinyllm.cli.tokenize, "get_tokenizer", fails)
    with pytest.raises(FileNotFoundError):
        main(["tokenize", "Hello"])


def test_output_piped_into_a_reader_that_quits_ends_quietly(tmp_path):
    # `tinyllm ... | head`: the reader is gone before the command writes.
    err = tmp_path / "stderr"
    with open(err, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "tinyllm", "tokenize", "Hello world " * 5000],
                             stdout=subprocess.PIPE, stderr=f)
        p.stdout.close()
        code = p.wait(timeout=120)
    assert err.read_text() == ""  # no BrokenPipeError traceback, no "Exception ignored" at exit
    assert code == 141  # as a tool killed by SIGPIPE reports it


@pytest.mark.parametrize("rank", [None, "0", "1"])
def test_ctrl_c_while_the_commands_are_imported_is_one_line_from_one_process(monkeypatch, capsys, rank):
    # Importing the subcommands (torch among them) takes seconds; a Ctrl-C there was a traceback of
    # ~30 lines, one per process under torchrun, where `tinyllm train --nproc` passes it to every one.
    def imports():
        raise KeyboardInterrupt

    monkeypatch.setattr(tinyllm.cli, "build_parser", imports)
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    try:
        code = main(["train"])
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C left main as a traceback")
    assert code == 130
    assert capsys.readouterr().err == ("" if rank == "1" else "tinyllm: interrupted\n")


@pytest.mark.parametrize("rank", ["0", "1"])
def test_an_error_every_process_meets_is_said_by_rank_0_and_the_others_let_it_exit_first(monkeypatch, capsys, rank):
    # torchrun stops the other workers once one exits: had rank 1 gone first, rank 0 could be
    # stopped before its line, and the user would read no reason at all.
    import tinyllm.cli as cli
    from tinyllm.errors import EveryRankError

    def fails(*args):
        raise EveryRankError("training diverged")

    waited: list[float] = []
    monkeypatch.setattr(tinyllm.cli.tokenize, "get_tokenizer", fails)
    monkeypatch.setattr(cli.time, "sleep", waited.append)
    monkeypatch.setenv("RANK", rank)
    assert main(["tokenize", "Hello"]) == 2
    err = capsys.readouterr().err
    if rank == "0":
        assert err == "tinyllm tokenize: error: training diverged\n" and waited == []
    else:
        assert err == "" and waited == [cli._RANK0_FIRST_S]


def test_a_home_path_joined_to_its_flag_is_the_users_home_not_a_folder_named_tilde(tmp_path, monkeypatch):
    # `--out=~/x` reaches us unexpanded (a shell expands `--out ~/x` only): it made ./~/x.
    home, here = tmp_path / "home", tmp_path / "here"
    home.mkdir(), here.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    (home / "notes.txt").write_text("The cat sat on the mat by the door. " * 200)
    assert main(["prepare", "--source", "~/notes.txt", "--out=~/data", "--quiet"]) == 0
    assert (home / "data" / "manifest.json").is_file() and list(here.iterdir()) == []
