"""The FastAPI application: routes, the chat page, and the worker's lifetime.

Why it is shaped this way:
- `create_app` takes a model object, not a run directory: loading a run is `tinyllm.runtime`'s
  business, and tests build an app around a tiny random model in memory.
- Routes are thin. Request bodies are read raw and validated by `schemas.parse_body` (not by
  FastAPI's body parameters) so every validation error, malformed JSON included, is an OpenAI
  error body with status 400 rather than FastAPI's 422 shape.
- The worker thread starts and stops with the app's lifespan, so an app that is built but never
  served starts no thread.
- FastAPI's interactive docs are off: they load their scripts from a CDN, and this server is
  meant to work with no network.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles

from tinyllm.model.gpt import GPT
from tinyllm.serve.endpoints import MODEL_ALIAS, OpenAIEndpoints
from tinyllm.serve.errors import BodyLimitMiddleware, install_error_handlers
from tinyllm.serve.runinfo import RunInfo, add_run_route
from tinyllm.serve.tokenizer_routes import add_tokenizer_routes
from tinyllm.serve.worker import GenerationWorker
from tinyllm.tokenizer import Tokenizer

DEFAULT_MODEL_NAME = MODEL_ALIAS  # `tinyllm serve` passes the run's name instead
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt that fits a small model's context


def create_app(
    model: GPT,
    tokenizer: Tokenizer,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_active: int = 32,
    max_queued: int = 256,
    max_choices: int = 16,
    threads: int | None = None,
    run_info: RunInfo | None = None,
) -> FastAPI:
    """An ASGI app serving `model` under the OpenAI API as `model_name`, plus a chat page at `/`.

    Requests may name the model `model_name` or `MODEL_ALIAS`; responses and GET /v1/models say
    `model_name`.

    max_active: sequences generated at once, decoded together in one forward a token (the rest
    wait in a queue). A larger value raises total tokens/s (a forward for more rows costs little
    more) and shortens the wait for a first token, and slows each stream. Each slot holds a row
    of the KV cache (the context's keys and values for every layer). max_queued: waiting sequences
    beyond which requests get 429; max_choices: n x prompts allowed in one request;
    max_body_bytes: larger request bodies get 413; threads: PyTorch threads for generation
    (default: one less than PyTorch's, leaving a core to the HTTP loop). run_info: what the page
    shows about the run at GET /run (`runinfo.read_run_info`; default: nothing but a note).
    """
    _check_pair(model, tokenizer, model_name)
    worker = GenerationWorker(model, max_active=max_active, max_queued=max_queued, threads=threads)
    api = OpenAIEndpoints(
        worker,
        tokenizer,
        model_name=model_name,
        context_length=model.config.block_size,
        vocab_size=model.config.vocab_size,
        max_choices=max_choices,
    )
    app = _app_around(worker, max_body_bytes)
    static = resources.files("tinyllm.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    _add_routes(app, api, worker, str(static / "index.html"))
    add_run_route(app, run_info or RunInfo())
    add_tokenizer_routes(app, tokenizer, model.config.block_size)
    # HTTP requires HEAD wherever GET is answered (uptime monitors and `curl -I` probe with it);
    # Starlette's routes add it, FastAPI's do not. The server sends the headers only.
    for route in app.routes:
        if isinstance(route, APIRoute) and "GET" in route.methods:
            route.methods.add("HEAD")
    return app


def _check_pair(model: GPT, tokenizer: Tokenizer, model_name: str) -> None:
    if not model_name:
        raise ValueError("model_name must be a non-empty string")
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is "
            f"{model.config.vocab_size}: they were not trained together"
        )


def _app_around(worker: GenerationWorker, max_body_bytes: int) -> FastAPI:
    """A bare app whose lifespan starts and stops `worker`, with OpenAI error bodies and a body limit."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(
        title="tinyllm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.worker = worker
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes)
    return app


def _add_routes(app: FastAPI, api: OpenAIEndpoints, worker: GenerationWorker, page: str) -> None:
    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(page, media_type="text/html")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": api.model_name, **asdict(worker.stats())}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [api.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict:
        api.check_model(name)
        return api.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await api.chat_completions(request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await api.completions(request)
