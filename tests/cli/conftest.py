"""A tiny trained run, made once per session, for the commands that work on one (chat, eval,
export, serve).

It is trained by the real `tinyllm train` (in-process, the tiny preset for 20 steps) on the
built-in corpus, without --data, so its config says "the built-in corpus" and the data lives in
the cache named by TINYLLM_CACHE: a command started with `tiny_run.env` finds it as a user's
would. RoPE instead of learned positions, so that generation can run past the context (the chat
test needs an answer long enough to interrupt); RMSNorm because RoPE exports need it. A context
(model.block_size, which is also the length of training rows) of 128 so that a story and a
question fit, for `eval --qa`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tinyllm.cli import main


@dataclass(frozen=True)
class TinyRun:
    path: Path
    env: dict[str, str]  # the environment a subprocess needs to find the run's data

    def tinyllm(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run the real `tinyllm` command to completion."""
        return subprocess.run([sys.executable, "-m", "tinyllm", *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("tiny-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYLLM_CACHE", str(cache))
        code = main(["train", "--preset", "tiny", "--out", str(out), "--max-steps", "20", "--sample-every", "0",
                     "--set", "data.builtin_tokens=80000", "--set", "model.pos_emb=rope",
                     "--set", "model.norm=rmsnorm", "--set", "model.block_size=128"])
    assert code == 0
    return TinyRun(out, {**os.environ, "TINYLLM_CACHE": str(cache)})
