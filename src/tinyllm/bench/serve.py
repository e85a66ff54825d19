"""`tinyllm bench serve`: generated tokens/s and time to first token at 1, 8 and 32 streaming clients.

Why it is shaped this way:
- It measures the whole stack a user meets (uvicorn, the OpenAI routes, SSE, the worker, the
  model) by starting the real server on a free localhost port and streaming chat completions to
  it from concurrent HTTP clients, as `tinyllm serve` would be used.
- The model is by default a preset's architecture with seeded random weights, since speed does not
  depend on training and random weights never stop early, so every request generates its full
  `--max-tokens`; `--run` measures a trained run instead.
- The clients run in the same process (an asyncio loop on the calling thread), so they share the
  CPU with the server. To keep their cost small they do not parse each chunk as JSON: they only
  look for the first piece of content (for the time to first token) and read the token count
  from the final usage chunk.
- Each level starts after a warm-up request, and every request gets a seed, so two runs of the
  same model on the same machine draw the same tokens.
- The server, httpx and torch are imported when the benchmark runs, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from tinyllm.bench import positive_ints
from tinyllm.errors import UserError

if TYPE_CHECKING:
    import httpx

    from tinyllm.model.gpt import GPT
    from tinyllm.tokenizer import Tokenizer

HELP = "serving tokens/s and time to first token at 1, 8 and 32 concurrent streaming clients"
DEFAULT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu", help="whose model size to serve, random weights (default cpu: 4 x 128)")
    p.add_argument("--run", metavar="RUN_DIR", help="serve this trained run instead of a preset's random model")
    p.add_argument("--concurrency", default="1,8,32", metavar="LIST",
                   help="comma-separated numbers of concurrent clients, one measurement each (default 1,8,32)")
    p.add_argument("--max-tokens", type=int, default=64, metavar="N", help="tokens per answer at most (default 64)")
    p.add_argument("--requests-per-client", type=int, default=2, metavar="N",
                   help="streaming chat requests each client sends, one after another (default 2)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="PyTorch threads for generation (default: the server's, one less than the cores)")


def run(args: argparse.Namespace) -> dict:
    levels = positive_ints("--concurrency", args.concurrency, "client counts", "1,8,32")
    if args.max_tokens < 1 or args.requests_per_client < 1 or (args.threads is not None and args.threads < 1):
        raise UserError("--max-tokens, --requests-per-client and --threads must be at least 1")
    import torch  # imported when the benchmark runs, not for --help

    from tinyllm.inference.layout import decode_layout
    from tinyllm.tokenizer import get_tokenizer

    if args.run:
        from tinyllm.runtime.checkpoint import load_model

        model, _, source = load_model(args.run)
    else:
        from tinyllm.config import resolve
        from tinyllm.model.gpt import GPT

        torch.manual_seed(0)
        model, source = GPT(resolve(args.preset).model).eval(), f"preset {args.preset}, random weights"
    decode_layout(model)
    cfg = model.config
    results = bench_serve(model, get_tokenizer(), concurrency=levels, max_tokens=args.max_tokens,
                          requests_per_client=args.requests_per_client, threads=args.threads)
    return {
        "model": str(source),
        "size": f"{cfg.n_layer} layers x {cfg.n_embd} wide, context {cfg.block_size}",
        "parameters": model.num_params(),
        "threads": args.threads or max(1, torch.get_num_threads() - 1),  # the worker's, as create_app picks
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests_per_client,
        "levels": [r.as_dict() for r in results],
        **_speedups(results),
    }


def _speedups(results: list) -> dict:
    """Each level's aggregate tokens/s over one client's, when 1 was measured: what batching buys.

    Keyed by client count as a string (JSON object keys); empty without a 1-client level.
    """
    one = next((r.tokens_per_s for r in results if r.clients == 1), None)
    if not one:
        return {}
    return {"speedup_vs_1": {str(r.clients): r.tokens_per_s / one for r in results if r.clients != 1}}


def format(result: dict) -> str:
    head = (f"{result['model']}: {result['size']}, {result['parameters']:,} parameters; streaming chat completions "
            f"of up to {result['max_tokens']} tokens, {result['requests_per_client']} per client")
    table = format_results([ServeBenchResult(**level) for level in result["levels"]])
    ratios = ", ".join(f"{n} clients {x:.2f}x" for n, x in result.get("speedup_vs_1", {}).items())
    return head + "\n" + table + (f"\naggregate tokens/s over 1 client's: {ratios}" if ratios else "")


# -- the measurement ------------------------------------------------------------------------------


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
    from tinyllm.serve.server import BackgroundServer

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
    import httpx

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
