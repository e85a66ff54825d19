"""Serving benchmark: generated tokens/s and time to first token at several numbers of clients.

Why it is shaped this way:
- It measures the whole stack a user meets (uvicorn, the OpenAI routes, SSE, the worker, the
  model) by starting the real server on a free localhost port and streaming chat completions to
  it from concurrent HTTP clients, as `tinyllm serve` would be used.
- The clients run in the same process (an asyncio loop on the calling thread), so they share the
  CPU with the server. To keep their cost small they do not parse each chunk as JSON: they only
  look for the first piece of content (for the time to first token) and read the token count
  from the final usage chunk.
- Each level starts after a warm-up request, and every request gets a seed, so two runs of the
  same model on the same machine draw the same tokens.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import httpx

from tinyllm.model.gpt import GPT
from tinyllm.serve.server import BackgroundServer
from tinyllm.tokenizer import Tokenizer

DEFAULT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@dataclass(frozen=True)
class ServeBenchResult:
    clients: int  # concurrent streaming clients
    requests: int  # completed requests (clients x requests_per_client)
    completion_tokens: int  # generated tokens, from the responses' usage
    wall_s: float  # from the first request sent to the last response finished
    tokens_per_s: float  # all clients together: completion_tokens / wall_s
    client_tokens_per_s: float  # mean per request: its tokens after the first / its streaming time
    ttft_mean_ms: float  # time to first token: request sent -> first content chunk received
    ttft_p50_ms: float
    ttft_max_ms: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Sample:
    ttft_s: float
    total_s: float
    tokens: int


def bench_serve(
    model: GPT,
    tokenizer: Tokenizer,
    *,
    concurrency: Sequence[int] = (1, 8, 32),
    max_tokens: int = 64,
    requests_per_client: int = 2,
    prompt: str = DEFAULT_PROMPT,
    **app_options,
) -> list[ServeBenchResult]:
    """Serve `model` on a free port and measure each level of `concurrency`; one result per level.

    `app_options` go to `create_app` (e.g. max_active); by default the server runs as
    `tinyllm serve` would.
    """
    if not concurrency or min(concurrency) < 1:
        raise ValueError(f"concurrency levels must be >= 1, got {list(concurrency)}")
    if max_tokens < 1 or requests_per_client < 1:
        raise ValueError("max_tokens and requests_per_client must be >= 1")
    app_options.setdefault("max_queued", max(concurrency))
    with BackgroundServer(model, tokenizer, model_name="bench", **app_options) as srv:
        return asyncio.run(
            _bench_levels(srv.url, concurrency, max_tokens, requests_per_client, prompt)
        )


def format_results(results: Sequence[ServeBenchResult]) -> str:
    """A plain-text table of the results, one row per concurrency level."""
    header = (
        f"{'clients':>7} {'requests':>8} {'tokens':>7} {'tok/s':>8} {'tok/s/client':>12} "
        f"{'TTFT mean':>10} {'TTFT p50':>9} {'TTFT max':>9}"
    )
    rows = [header]
    for r in results:
        rows.append(
            f"{r.clients:>7} {r.requests:>8} {r.completion_tokens:>7} {r.tokens_per_s:>8.1f} "
            f"{r.client_tokens_per_s:>12.1f} {r.ttft_mean_ms:>8.0f}ms {r.ttft_p50_ms:>7.0f}ms "
            f"{r.ttft_max_ms:>7.0f}ms"
        )
    return "\n".join(rows)


async def _bench_levels(
    url: str, concurrency: Sequence[int], max_tokens: int, per_client: int, prompt: str
) -> list[ServeBenchResult]:
    limits = httpx.Limits(
        max_connections=max(concurrency) + 1, max_keepalive_connections=max(concurrency) + 1
    )
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as http:
        await _one_request(http, prompt, max_tokens=4, seed=0)  # warm-up: first forward, connection
        results = []
        for clients in concurrency:
            start = time.perf_counter()
            per = await asyncio.gather(
                *(
                    _client(http, prompt, max_tokens, per_client, seed=1000 * c)
                    for c in range(clients)
                )
            )
            wall = time.perf_counter() - start
            results.append(_summarise(clients, [s for samples in per for s in samples], wall))
        return results


async def _client(
    http: httpx.AsyncClient, prompt: str, max_tokens: int, n: int, seed: int
) -> list[_Sample]:
    return [await _one_request(http, prompt, max_tokens, seed + i) for i in range(n)]


async def _one_request(http: httpx.AsyncClient, prompt: str, max_tokens: int, seed: int) -> _Sample:
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(
                f"benchmark request failed: HTTP {response.status_code} {await response.aread()!r}"
            )
        async for line in response.aiter_lines():
            if first is None and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter()
            elif line.startswith("data: {") and '"usage":{' in line:
                tokens = json.loads(line[len("data: ") :])["usage"]["completion_tokens"]
    end = time.perf_counter()
    first = end if first is None else first  # an empty answer: its first token time is its end
    return _Sample(first - sent, end - sent, tokens)


def _summarise(clients: int, samples: list[_Sample], wall: float) -> ServeBenchResult:
    tokens = sum(s.tokens for s in samples)
    ttfts = [s.ttft_s * 1000 for s in samples]
    rates = [
        (s.tokens - 1) / (s.total_s - s.ttft_s)
        for s in samples
        if s.tokens > 1 and s.total_s > s.ttft_s
    ]
    return ServeBenchResult(
        clients=clients,
        requests=len(samples),
        completion_tokens=tokens,
        wall_s=wall,
        tokens_per_s=tokens / wall,
        client_tokens_per_s=statistics.fmean(rates) if rates else 0.0,
        ttft_mean_ms=statistics.fmean(ttfts),
        ttft_p50_ms=statistics.median(ttfts),
        ttft_max_ms=max(ttfts),
    )
