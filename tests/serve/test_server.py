"""Starting the server: localhost by default, a clear error for a busy port, a clean stop."""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
import threading
import time
from typing import NoReturn

import httpx
import pytest

from tinyllm.errors import UserError
from tinyllm.serve import BackgroundServer, create_app, serve


def test_binds_localhost_unless_told_otherwise():
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(BackgroundServer).parameters["host"].default == "127.0.0.1"


def workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tinyllm-generation"]


def test_a_busy_port_is_a_user_error_and_leaves_no_thread(make_model, tokenizer):
    before = workers()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"127.0.0.1:{port}.*--port"):
            serve(make_model(), tokenizer, port=port, log_level="critical")
    assert workers() == before


def test_a_busy_port_is_refused_before_the_app_starts(make_model, tokenizer, capfd):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match="in use"):
            serve(make_model(), tokenizer, port=port)
    assert "startup" not in capfd.readouterr().err  # the one-line error is all the user sees


class _Stopped(Exception):
    pass


def _fail(message: str) -> NoReturn:
    raise AssertionError(message)


def test_the_port_is_ours_once_serving_is_announced(make_model, tokenizer):
    """Two servers started together on one port: the second gets the one-line error. (Both bound
    it, neither listening yet, and the second then died in uvicorn with a traceback.)"""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def start_a_second_server() -> None:
        with pytest.raises(UserError, match="in use"):
            serve(make_model(), tokenizer, port=port, on_listening=lambda: _fail("both got the port"))
        raise _Stopped  # the first server goes no further

    with pytest.raises(_Stopped):
        serve(make_model(), tokenizer, port=port, on_listening=start_a_second_server)


def test_stopping_the_server_stops_its_worker(make_model, tokenizer):
    before = workers()
    with BackgroundServer(make_model(), tokenizer) as srv:
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"
        assert len(workers()) == len(before) + 1
    assert workers() == before


@pytest.mark.parametrize("force", [False, True], ids=["stop", "second-ctrl-c"])
def test_a_stream_running_at_shutdown_ends_with_an_error_and_done(make_model, slow_gpt, tokenizer, force):
    # ~20 ms a token for 200 tokens outlasts the background server's 2 s grace.
    before = workers()
    srv = BackgroundServer(make_model(slow_gpt), tokenizer).start()
    no_stop = {str(i): -100 for i in range(50256, 50260)}  # the special ids end a text early
    body = {"model": "tinyllm", "prompt": "Once", "max_tokens": 200, "stream": True, "logit_bias": no_stop}
    lines: list[str] = []
    first = threading.Event()

    def read() -> None:
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():  # raised on a reply cut mid-body before the fix
                lines.append(line)
                first.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert first.wait(10)
    finally:
        srv._server.force_exit = force  # what uvicorn sets on a second Ctrl-C
        srv.stop()
        reader.join(10)
    data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    error = json.loads(data[-2].removeprefix("data: "))["error"]
    assert "shutting down" in error["message"] and error["code"] == "server_unavailable"
    assert workers() == before


def test_a_request_cut_off_by_shutdown_gets_503_not_500(make_model, slow_gpt, tokenizer):
    # A server error (500) tells a client the request failed; 503 that it was fine and may be retried.
    srv = BackgroundServer(make_model(slow_gpt), tokenizer).start()
    no_stop = {str(i): -100 for i in range(50256, 50260)}
    body = {"model": "tinyllm", "prompt": "Once", "max_tokens": 200, "logit_bias": no_stop}
    replies: list[httpx.Response] = []
    asking = threading.Thread(target=lambda: replies.append(httpx.post(srv.url + "/v1/completions", json=body,
                                                                        timeout=30)))
    asking.start()
    try:
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/health").json().get("active", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        srv.stop()
        asking.join(10)
    assert replies[0].status_code == 503
    assert replies[0].json()["error"]["code"] == "server_unavailable"


def test_a_tokenizer_of_another_vocabulary_is_refused(make_model, tokenizer):
    with pytest.raises(ValueError, match="vocabulary"):
        create_app(make_model(vocab_size=1000), tokenizer)


def test_the_chat_page_and_its_assets_are_served(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="/static/chat.js"' in page.text
    for asset in ("/static/chat.js", "/static/chat.css"):
        assert httpx.get(server.url + asset).status_code == 200


@pytest.mark.parametrize("path", ["/", "/health", "/v1/models", "/run", "/tokenizer_info"])
def test_every_get_route_answers_head_with_the_headers_and_no_body(server, path):
    """Uptime monitors and `curl -I` probe with HEAD, which HTTP requires wherever GET works."""
    got, head = httpx.get(server.url + path), httpx.head(server.url + path)
    assert head.status_code == got.status_code == 200
    assert head.headers["content-type"] == got.headers["content-type"]
    assert head.content == b""


def test_an_app_whose_worker_is_not_running_answers_503_instead_of_hanging(make_model, tokenizer):
    app = create_app(
        make_model(), tokenizer, model_name="m"
    )  # lifespan never run: no worker thread
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await client.post("/v1/chat/completions", json=body, timeout=5)

    r = asyncio.run(ask())
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "server_unavailable"
