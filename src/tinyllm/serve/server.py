"""Running the app under uvicorn: in the foreground (`serve`) or on a background thread.

Why it is shaped this way: the CLI wants a blocking call; the tests and the benchmark want a real
server (real sockets, real HTTP, real disconnects) that they can start on a free port and stop
again in-process. Both go through uvicorn's `Server`, so what the tests exercise is what ships.
The background server asks the OS for the port (port 0) instead of guessing a free one, which
would race with other processes.

On shutdown uvicorn waits `timeout_graceful_shutdown` for responses to finish, then cancels them:
a stream still running was cut mid-body (the client saw an incomplete read, no error and no
[DONE]) and the cancelled task printed a traceback. `_Server` stops the generation worker a
second before that deadline, so each job still running ends with "the server is shutting down",
which its stream sends as an error event before [DONE] and a plain request as an error body. A
second Ctrl-C (uvicorn's "force quit") fails them at once and exits within that second.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
import time
from collections.abc import Callable

import uvicorn

from tinyllm.errors import UserError
from tinyllm.model.gpt import GPT
from tinyllm.serve.app import DEFAULT_MODEL_NAME, create_app
from tinyllm.serve.worker import GenerationWorker
from tinyllm.tokenizer import Tokenizer

# Left between failing the worker's jobs and uvicorn's cancelling the requests: enough for the
# event loop to send each stream's error event and [DONE].
_FLUSH_S = 1.0
_log = logging.getLogger("uvicorn.error")  # uvicorn's own, so its level and format apply


class _Server(uvicorn.Server):
    """uvicorn's server, failing the worker's jobs before the graceful timeout cuts their replies."""

    def __init__(self, config: uvicorn.Config, worker: GenerationWorker) -> None:
        super().__init__(config)
        self._worker = worker

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if sockets and self.started:  # uvicorn says where it listens only on sockets it bound itself
            host, port = sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            _log.info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", shown, port)

    async def shutdown(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        grace = self.config.timeout_graceful_shutdown or 0
        # stop() joins the worker thread (it finishes its current forward): off the event loop.
        timer = loop.call_later(
            max(0.0, grace - _FLUSH_S), lambda: loop.run_in_executor(None, self._worker.stop)
        )
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
        if self.force_exit:
            # A second Ctrl-C skips the wait and the app's shutdown: uvicorn would leave the
            # requests and the lifespan to be cancelled at exit, a traceback each. Failing the jobs
            # now lets the requests end, quickly, as above; then the app shuts down as usual.
            await loop.run_in_executor(None, self._worker.stop)
            deadline = loop.time() + _FLUSH_S
            while self.server_state.tasks and loop.time() < deadline:
                await asyncio.sleep(0.05)
            await self.lifespan.shutdown()


def serve(
    model: GPT,
    tokenizer: Tokenizer,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str = DEFAULT_MODEL_NAME,
    log_level: str = "info",
    on_listening: Callable[[], None] | None = None,
    **app_options,
) -> None:
    """Serve `model` until interrupted. `app_options` go to `create_app` (limits, queue sizes);
    `on_listening` is called once the port is ours (a command's "serving ..." line)."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port: use 1..65535 (or 0 for any free port)")
    sock = _listen(host, port)  # before the app starts its worker, so a busy port fails alone
    with sock:
        if on_listening is not None:
            on_listening()
        app = create_app(model, tokenizer, model_name=model_name, **app_options)
        config = uvicorn.Config(
            app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5
        )
        _Server(config, app.state.worker).run(sockets=[sock])


def _listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, or a one-line error. (uvicorn's own bind failure started
    and stopped the app around it, logging each step, then exited.)"""
    # The family as uvicorn picks it: `localhost` stays IPv4 even where it resolves to ::1 first.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart at once
    try:
        sock.bind((host, port))
        # Listening now, not once uvicorn starts: with SO_REUSEADDR a second server could bind the
        # port while this one was starting its app, then die in uvicorn with a traceback.
        sock.listen()
    except OSError as e:
        sock.close()
        busy = " (is another server on it?)" if e.errno == errno.EADDRINUSE else ""
        raise UserError(
            f"cannot listen on {host}:{port}: {e.strerror}{busy}: pick another --port or --host"
        ) from None
    return sock


class BackgroundServer:
    """A real uvicorn server on a free localhost port, on a daemon thread. Use as a context manager.

    >>> with BackgroundServer(model, tokenizer, model_name="tiny") as srv:
    ...     openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        *,
        host: str = "127.0.0.1",
        model_name: str = DEFAULT_MODEL_NAME,
        start_timeout: float = 30.0,
        **app_options,
    ) -> None:
        app = create_app(model, tokenizer, model_name=model_name, **app_options)
        self.app = app
        self._server = _Server(
            uvicorn.Config(app, host=host, port=0, log_level="warning", timeout_graceful_shutdown=2),
            app.state.worker,
        )
        self._host = host
        self._start_timeout = start_timeout
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The base URL, e.g. http://127.0.0.1:43121 (the OpenAI base URL is this + /v1)."""
        return f"http://{self._host}:{self.port}"

    def start(self) -> BackgroundServer:
        self._thread = threading.Thread(
            target=self._server.run, name="tinyllm-uvicorn", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start (see its log)")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
