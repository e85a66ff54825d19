"""`tinyllm bench serve`: generated tokens/s and time to first token at 1, 8 and 32 streaming clients.

Why it is shaped this way: the measurement is `tinyllm.serve.bench.bench_serve` (the real server
on a free port, real HTTP clients); this module only picks the model. By default that is a
preset's architecture with seeded random weights, since speed does not depend on training and
random weights never stop early, so every request generates its full `--max-tokens`; `--run`
measures a trained run instead.
"""

from __future__ import annotations

import argparse

from tinyllm.errors import UserError

HELP = "serving tokens/s and time to first token at 1, 8 and 32 concurrent streaming clients"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu", help="whose model size to serve, random weights (default cpu: 4 x 256)")
    p.add_argument("--run", metavar="RUN_DIR", help="serve this trained run instead of a preset's random model")
    p.add_argument("--concurrency", default="1,8,32", metavar="LIST",
                   help="comma-separated numbers of concurrent clients, one measurement each (default 1,8,32)")
    p.add_argument("--max-tokens", type=int, default=64, metavar="N", help="tokens per answer at most (default 64)")
    p.add_argument("--requests-per-client", type=int, default=2, metavar="N",
                   help="streaming chat requests each client sends, one after another (default 2)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="PyTorch threads for generation (default: the server's, one less than the cores)")


def run(args: argparse.Namespace) -> dict:
    levels = _levels(args.concurrency)
    if args.max_tokens < 1 or args.requests_per_client < 1 or (args.threads is not None and args.threads < 1):
        raise UserError("--max-tokens, --requests-per-client and --threads must be at least 1")
    import torch  # imported when the benchmark runs, not for --help

    from tinyllm.serve.bench import bench_serve
    from tinyllm.tokenizer import get_tokenizer

    if args.run:
        from tinyllm.runtime.checkpoint import load_model

        model, _, source = load_model(args.run)
    else:
        from tinyllm.config import resolve
        from tinyllm.model.gpt import GPT

        torch.manual_seed(0)
        model, source = GPT(resolve(args.preset).model).eval(), f"preset {args.preset}, random weights"
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


def _levels(text: str) -> list[int]:
    try:
        levels = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise UserError(f"--concurrency {text}: give comma-separated positive client counts, e.g. 1,8,32")
    return levels


def format(result: dict) -> str:
    from tinyllm.serve.bench import ServeBenchResult, format_results

    head = (f"{result['model']}: {result['size']}, {result['parameters']:,} parameters; streaming chat completions "
            f"of up to {result['max_tokens']} tokens, {result['requests_per_client']} per client")
    table = format_results([ServeBenchResult(**level) for level in result["levels"]])
    ratios = ", ".join(f"{n} clients {x:.2f}x" for n, x in result.get("speedup_vs_1", {}).items())
    return head + "\n" + table + (f"\naggregate tokens/s over 1 client's: {ratios}" if ratios else "")
