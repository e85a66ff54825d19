"""`tinyllm serve`: an OpenAI-compatible HTTP server and a chat page for a trained run.

Why it is shaped this way: the server is `tinyllm.serve` (uvicorn, the OpenAI routes, the
generation worker); this module loads the run, checks the flags as one-line errors (the library
raises ValueError for them, which would be a traceback), and blocks in `serve` until Ctrl-C or
SIGTERM. Either way uvicorn lets the requests in flight finish for up to 4 s (then each ends with
an error saying the server is shutting down: `tinyllm.serve.server`), stops the worker, and
re-raises the signal: Ctrl-C, the normal way to stop a server, ends the command with status
0; SIGTERM ends it as SIGTERM does, as service managers expect.
"""

from __future__ import annotations

import argparse

from tinyllm.cli.run_args import add_quantize_argument, add_run_arguments, load_run
from tinyllm.errors import UserError

# The library's defaults, repeated so that --help can show them without importing the server.
MODEL_ALIAS = "tinyllm"  # the name every server also answers to (tinyllm.serve.endpoints)
_DEFAULTS = {"max_active": 32, "max_queued": 256, "max_body_bytes": 1 << 20}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a trained run over the OpenAI API, with a chat page",
        description="Serve RUN_DIR's newest checkpoint (or --checkpoint) at http://HOST:PORT: the chat page at /, "
        "the OpenAI API at /v1 (models, completions, chat/completions, streaming included) and /health. "
        "Any OpenAI client works: base_url=http://HOST:PORT/v1, any api_key. Ctrl-C stops it.",
    )
    add_run_arguments(p)
    add_quantize_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only; "
                   "0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one, printed at start)")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model id listed by GET /v1/models and named in answers (default: the run "
                   f"directory's name); requests may also ask for {MODEL_ALIAS!r}")
    p.add_argument("--max-active", type=int, default=_DEFAULTS["max_active"], metavar="N",
                   help=f"sequences generated at once, decoded together, one forward a token (default {_DEFAULTS['max_active']})")
    p.add_argument("--max-queued", type=int, default=_DEFAULTS["max_queued"], metavar="N",
                   help=f"sequences waiting for a slot before requests get HTTP 429 (default {_DEFAULTS['max_queued']})")
    p.add_argument("--max-body-bytes", type=int, default=_DEFAULTS["max_body_bytes"], metavar="N",
                   help=f"larger request bodies get HTTP 413 (default {_DEFAULTS['max_body_bytes']:,})")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="PyTorch threads for generation (default: one less than the cores, leaving one to HTTP)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    _check_flags(args)
    from tinyllm.serve import serve  # torch, uvicorn: after --help
    from tinyllm.serve.runinfo import read_run_info
    from tinyllm.tokenizer import get_tokenizer

    model, _, ckpt = load_run(args, "serve")
    info = read_run_info(ckpt)  # the page's run name, step, val loss and loss curve
    name = args.model_name or info.name
    listening = f"serving {ckpt} as model {name!r}: chat page at /, OpenAI API at /v1 (Ctrl-C stops)"
    try:  # the line only once the port is ours: a busy port's error is then all a user sees
        serve(model, get_tokenizer(), host=args.host, port=args.port, model_name=name,
              on_listening=lambda: print(listening, flush=True),
              max_active=args.max_active, max_queued=args.max_queued, max_body_bytes=args.max_body_bytes,
              threads=args.threads, run_info=info)
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the Ctrl-C it caught
        pass
    print("server stopped", flush=True)
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a TCP port: use 1..65535 (or 0 for any free port)")
    for flag, least in (("max_active", 1), ("max_queued", 0), ("max_body_bytes", 1), ("threads", 1)):
        value = getattr(args, flag)
        if value is not None and value < least:
            raise UserError(f"--{flag.replace('_', '-')} must be at least {least}, got {value}")
    if args.model_name is not None and not args.model_name.strip():
        raise UserError("--model-name must not be empty")
