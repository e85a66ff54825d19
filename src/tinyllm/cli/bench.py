"""`tinyllm bench WHAT`: run one benchmark from tinyllm.bench and print its figures."""

from __future__ import annotations

import argparse
import json

from tinyllm import bench


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure throughput of a part of tinyllm",
        description="Run a benchmark and print its figures (as JSON with --json). Close other heavy "
        "processes first: the figures are wall-clock rates.",
    )
    which = p.add_subparsers(dest="benchmark", metavar="WHAT", required=True)
    for name in bench.BENCHMARKS:
        module = bench.load(name)
        b = which.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(b)
        b.add_argument("--json", action="store_true", help="print the figures as one JSON object")
        b.set_defaults(func=run, bench_module=module)


def run(args: argparse.Namespace) -> int:
    result = args.bench_module.run(args)
    print(json.dumps(result) if args.json else args.bench_module.format(result))
    return 1 if result.get("ok") is False else 0  # bench gpu: a part failed (the summary says which)
