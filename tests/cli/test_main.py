"""The `tinyllm` entry point: what reaches the user when a command fails."""

import errno
import os

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
