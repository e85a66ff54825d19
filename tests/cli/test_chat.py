"""`tinyllm chat` driven as a person drives it: the real process on a pseudo-terminal, keys typed.

The process gets the terminal as its controlling terminal, so Ctrl-C and Ctrl-D typed into it
become SIGINT and end-of-input exactly as in a shell. How SIGINT is disposed when the process
starts is set here too, not inherited from whatever started pytest: a shell script's background
job (`bash .ci/run &`) ignores SIGINT, and the chat must work either way.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import termios
import time

import pytest

from tinyllm.inference.chat import ChatSession
from tinyllm.runtime.checkpoint import load_model
from tinyllm.tokenizer import get_tokenizer

# Runs in the child after setsid(): make the pty on stdin our controlling terminal, set SIGINT to
# argv[1] (SIG_DFL as an interactive shell leaves it, or SIG_IGN as a script's `cmd &` does), exec.
_WITH_TERMINAL = ("import fcntl, os, signal, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                  "signal.signal(signal.SIGINT, getattr(signal, sys.argv[1])); os.execv(sys.argv[2], sys.argv[2:])")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    def __init__(self, args: list[str], env: dict[str, str], sigint: str = "SIG_DFL") -> None:
        master, slave = pty.openpty()
        # On Ctrl-C a terminal discards output not yet displayed. A terminal window displays at
        # once; this harness reads only when it looks, so the prompt printed in answer to a
        # Ctrl-C could be thrown away before it is read. NOFLSH keeps it.
        attrs = termios.tcgetattr(slave)
        attrs[3] |= termios.NOFLSH
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        self.proc = subprocess.Popen([sys.executable, "-c", _WITH_TERMINAL, sigint, sys.executable, "-m", "tinyllm", *args],
                                     stdin=slave, stdout=slave, stderr=slave, env={**env, "TERM": "dumb"},
                                     start_new_session=True)
        os.close(slave)
        self.fd, self.screen, self.pos = master, "", 0

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def expect(self, text: str, timeout: float = 120) -> str:
        """Wait until `text` appears after what was already matched; returns the output before it."""
        deadline = time.monotonic() + timeout
        while (i := self.screen.find(text, self.pos)) < 0:
            if time.monotonic() > deadline or not self._read(deadline - time.monotonic()):
                raise AssertionError(f"{text!r} did not appear; the terminal shows:\n{self.screen}")
        before, self.pos = self.screen[self.pos:i], i + len(text)
        return before

    def _read(self, timeout: float) -> bool:
        if select.select([self.fd], [], [], max(0.0, timeout))[0]:
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # the process has exited and closed the terminal
                return False
            self.screen += ANSI.sub("", data.decode(errors="replace").replace("\r\n", "\n"))
            return bool(data)
        return True

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.fd)


@pytest.fixture
def chat(tiny_run):
    terminals: list[Terminal] = []

    def start(*flags: str, sigint: str = "SIG_DFL") -> Terminal:
        terminals.append(Terminal(["chat", "--run", str(tiny_run.path), *flags], tiny_run.env, sigint))
        return terminals[-1]

    yield start
    for t in terminals:
        t.close()


def expected_answers(run, questions: list[str], system: str, max_new_tokens: int) -> list[str]:
    model, _, _ = load_model(run)
    session = ChatSession(model, get_tokenizer(), system=system, max_new_tokens=max_new_tokens, temperature=0)
    return ["".join(session.reply(q)) for q in questions]


def test_a_conversation_streams_answers_resets_and_ends_with_ctrl_d(chat, tiny_run):
    t = chat("--system", "You answer questions.", "--temperature", "0", "--max-new-tokens", "10")
    t.expect("you> ")
    t.type("Who has the kite?\r")
    t.expect("model> ")
    first = t.expect("\nyou> ")
    t.type("And the dog?\r")
    t.expect("model> ")
    second = t.expect("\nyou> ")
    assert [first, second] == expected_answers(tiny_run.path, ["Who has the kite?", "And the dog?"],
                                               "You answer questions.", 10)
    t.type("/reset\r")
    t.expect("(new conversation)")
    t.type("And the dog?\r")  # asked afresh: the answer to it as a first question
    t.expect("model> ")
    assert t.expect("\nyou> ") == expected_answers(tiny_run.path, ["And the dog?"], "You answer questions.", 10)[0]
    t.type("\x04")  # Ctrl-D
    assert t.proc.wait(timeout=30) == 0


# SIG_IGN: started as a script's background job is, e.g. `bash .ci/run &`; Ctrl-C was then lost.
@pytest.mark.parametrize("sigint", ["SIG_DFL", "SIG_IGN"])
def test_ctrl_c_stops_an_answer_and_returns_to_the_prompt(chat, sigint):
    # RoPE: generation goes on past the context, so this answer would run for minutes.
    t = chat("--temperature", "0", "--max-new-tokens", "1000000", sigint=sigint)
    t.expect("you> ")
    t.type("Tell me a very long story.\r")
    t.expect("model> ")
    deadline = time.monotonic() + 30
    while not t.screen[t.pos:].strip() and time.monotonic() < deadline:
        t._read(1)
    # The answer is streaming: some of it is on the screen, and it has not ended ...
    assert t.screen[t.pos:].strip() and "you> " not in t.screen[t.pos:]
    t.type("\x03")  # ... when Ctrl-C stops it
    t.expect(" [stopped]\n", timeout=30)
    t.expect("you> ")
    assert t.proc.poll() is None  # still running, at the prompt
    # A person takes a moment before pressing a key. (A SIGINT in the microseconds between the
    # prompt being drawn and readline waiting for a key is only seen at the next key: CPython.)
    time.sleep(0.5)
    t.type("\x03")  # Ctrl-C at the prompt only abandons the line
    t.expect("you> ")
    t.type("/exit\r")
    assert t.proc.wait(timeout=30) == 0


def test_piped_questions_appear_in_the_transcript(tiny_run):
    # `tinyllm chat < questions.txt > transcript.txt`: no terminal echoes what was asked.
    r = subprocess.run([sys.executable, "-m", "tinyllm", "chat", "--run", str(tiny_run.path), "--temperature", "0",
                        "--max-new-tokens", "5"], input="Who has the kite?\n/reset\n", capture_output=True,
                       text=True, env=tiny_run.env, timeout=300)
    assert r.returncode == 0, r.stderr
    answer = expected_answers(tiny_run.path, ["Who has the kite?"], None, 5)[0]
    assert r.stdout.endswith(f"\nyou> Who has the kite?\nmodel> {answer}\nyou> /reset\n(new conversation)\nyou> \n")
