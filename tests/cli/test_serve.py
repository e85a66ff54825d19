"""`tinyllm serve` serves the run's model, under the run's name, to an OpenAI client and stops
cleanly on Ctrl-C."""

from __future__ import annotations

import inspect
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai

from tinyllm.cli import serve as serve_cli
from tinyllm.inference.sampling import generate
from tinyllm.runtime.checkpoint import load_model
from tinyllm.serve import app as serve_app
from tinyllm.serve import endpoints as serve_endpoints
from tinyllm.tokenizer import STOP_IDS, get_tokenizer


class Lines:
    """The process's output lines as they come, read on a thread so waiting can time out."""

    def __init__(self, stream) -> None:
        self.seen: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self._q.put(line) for line in stream], daemon=True).start()

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(line)
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"no line matching {pattern!r} in {timeout}s; output:\n{''.join(self.seen)}")


def test_serve_answers_an_openai_client_and_stops_on_ctrl_c(tiny_run):
    name = tiny_run.path.name  # served under the run's name unless --model-name says otherwise
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinyllm", "serve", "--run", str(tiny_run.path), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=tiny_run.env)
    try:
        out = Lines(proc.stdout)
        url = out.wait_for(r"Uvicorn running on (http://127\.0\.0\.1:\d+)").group(1)
        health = httpx.get(url + "/health", timeout=10).json()
        assert health["status"] == "ok" and health["model"] == name
        # The page's run facts and curve, from the files the trainer wrote: 20 steps logged, val at 0/10/20.
        run = httpx.get(url + "/run", timeout=10).json()
        assert (run["name"], run["checkpoint"], run["step"]) == (name, "step-00000020", 20)
        assert run["curve"]["step"] == list(range(21)) and run["val_loss"] == run["curve"]["val_loss"][-1]
        assert [s for s, v in zip(run["curve"]["step"], run["curve"]["val_loss"], strict=True) if v] == [0, 10, 20]

        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        assert [m.id for m in client.models.list()] == [name]
        assert client.models.retrieve(serve_cli.MODEL_ALIAS).id == name  # the alias still answers
        messages = [{"role": "user", "content": "Who has the kite?"}]
        reply = client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0)

        # The same greedy tokens the run's model gives in-process, for the same prompt.
        tok = get_tokenizer()
        model, _, _ = load_model(tiny_run.path)
        ids = generate(model, tok.prompt_ids(messages=messages), 6, temperature=0, stop_ids=STOP_IDS)
        assert reply.choices[0].message.content == tok.decode_text(ids)
        assert reply.model == name and 0 < reply.usage.completion_tokens <= 6

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        out.wait_for(r"Finished server process", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_flags_are_one_line_errors(tiny_run):
    for flags, message in ((["--port", "70000"], "is not a TCP port"),
                           (["--max-active", "0"], "--max-active must be at least 1"),
                           (["--threads", "0"], "--threads must be at least 1")):
        r = tiny_run.tinyllm("serve", "--run", str(tiny_run.path), *flags)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_a_busy_port_is_the_only_line_a_user_sees(tiny_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = tiny_run.tinyllm("serve", "--run", str(tiny_run.path), "--port", str(port))
    assert r.returncode == 2 and "in use" in r.stderr and len(r.stderr.splitlines()) == 1
    assert "serving" not in r.stdout  # it said it was serving, then that it could not


def test_help_shows_the_servers_own_defaults():
    defaults = inspect.signature(serve_app.create_app).parameters
    for name, value in serve_cli._DEFAULTS.items():
        assert defaults[name].default == value
    assert serve_cli.MODEL_ALIAS == serve_endpoints.MODEL_ALIAS
