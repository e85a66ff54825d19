"""Several requests are served at once; a client that goes away frees its slot; a full server says 429.

These run against a model that takes >= 20 ms a token, so a 40-token answer lasts ~1 s per
client: long enough to watch requests overlap and to hang up in the middle of one.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from tinyllm.serve import BackgroundServer

HELLO = [{"role": "user", "content": "Tell me a story."}]


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=5).json()


def test_concurrent_streams_progress_together(slow_server, model_name):
    client = openai.OpenAI(base_url=slow_server.url + "/v1", api_key="unused", max_retries=0)
    first_token, finished = {}, {}

    def one(i: int) -> None:
        stream = client.chat.completions.create(
            model=model_name, messages=HELLO, max_tokens=15, temperature=0, stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and i not in first_token:
                first_token[i] = time.monotonic()
        finished[i] = time.monotonic()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(finished) == 4 and len(first_token) == 4
    # Served one after another, the last client would see its first token only after the first
    # client had its whole answer.
    assert max(first_token.values()) < min(finished.values())


def test_a_client_that_disconnects_mid_stream_frees_its_slot(slow_server, model_name, wait_for):
    before = health(slow_server)
    body = {"model": model_name, "messages": HELLO, "max_tokens": 200, "stream": True}
    with httpx.Client(timeout=10) as http:
        with http.stream("POST", slow_server.url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while '"content":"' not in next(lines) or False:
                pass  # wait for a first piece of content
            assert health(slow_server)["active"] == 1
    # The stream closed after a few tokens of 200; the job must go within a few rounds.
    assert wait_for(lambda: health(slow_server)["active"] == 0, timeout=3)
    after = health(slow_server)
    assert after["jobs_cancelled"] == before["jobs_cancelled"] + 1
    assert after["tokens_generated"] - before["tokens_generated"] < 100


def test_a_non_streaming_client_that_gives_up_frees_its_slot(slow_server, model_name, wait_for):
    before = health(slow_server)
    body = {"model": model_name, "messages": HELLO, "max_tokens": 200}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            slow_server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.5)
        )
    assert wait_for(lambda: health(slow_server)["active"] == 0, timeout=3)
    after = health(slow_server)
    assert after["jobs_cancelled"] == before["jobs_cancelled"] + 1
    assert after["tokens_generated"] - before["tokens_generated"] < 100


def test_a_full_server_answers_429_and_recovers(
    tokenizer, make_model, slow_gpt, model_name, wait_for
):
    with BackgroundServer(
        make_model(slow_gpt), tokenizer, model_name=model_name, max_active=1, max_queued=1
    ) as srv:
        body = {"model": model_name, "prompt": "Once", "max_tokens": 100, "stream": True}
        with httpx.Client(timeout=10) as a, httpx.Client(timeout=10) as b:
            with a.stream("POST", srv.url + "/v1/completions", json=body) as running:
                with b.stream("POST", srv.url + "/v1/completions", json=body) as waiting:
                    assert wait_for(lambda: health(srv)["queued"] == 1)
                    refused = httpx.post(srv.url + "/v1/completions", json=body, timeout=10)
                    assert refused.status_code == 429
                    assert refused.json()["error"]["type"] == "rate_limit_error"
                    assert running.status_code == waiting.status_code == 200
        assert wait_for(lambda: health(srv)["active"] == 0 and health(srv)["queued"] == 0)
        ok = httpx.post(
            srv.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=10
        )
        assert ok.status_code == 200
