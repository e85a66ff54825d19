"""`tinyllm sample`: load a run's newest (or a chosen) checkpoint and stream a continuation.

The prompt is the tokenizer's `prompt_ids` (a new document: `<|endoftext|>`, then the text) and
generation ends at any special id (`STOP_IDS`), as on every other surface; only text is printed.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator

from tinyllm.cli.run_args import add_quantize_argument, add_run_arguments, load_run
from tinyllm.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="generate text from a trained run",
        description="Load RUN_DIR's newest checkpoint (or --checkpoint) and print the prompt and its "
        "continuation as it is generated. Generation starts a new document (after <|endoftext|>) and "
        "stops where the text ends (at <|endoftext|>, or where a chat would begin). A prompt too long for the "
        "model's context keeps its end, leaving room for --max-new-tokens (up to half the context).",
    )
    add_run_arguments(p)
    add_quantize_argument(p)
    p.add_argument("--prompt", default="", help="text to continue (default: none, a story from scratch)")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="tokens to generate at most (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="sampling temperature; 0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, metavar="K", help="sample among the K most likely tokens; 0 for all (default 50)")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling: the smallest set reaching probability P (default off)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="random seed, for a repeatable sample")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    # Imported here so --help answers without loading torch.
    from tinyllm.tokenizer import get_tokenizer

    model, _, _ = load_run(args, "sample from")
    tok = get_tokenizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pieces = continuation(model, tok, args.prompt, args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k or None, top_p=args.top_p, seed=args.seed)
        sys.stdout.write(args.prompt)
        try:
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # end the text's line, so "tinyllm sample: interrupted" starts its own
            sys.stdout.write("\n")
            sys.stdout.flush()
            raise
    sys.stdout.write("\n")
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)
    return 0


def continuation(model, tok, prompt: str, max_new_tokens: int, **sampling) -> Iterator[str]:
    """The text the model writes after `prompt`, in pieces as it is generated.

    `sampling` is `generate`'s (temperature, top_k, top_p, seed); arguments are checked at the call.
    """
    from tinyllm.inference.sampling import generate
    from tinyllm.inference.textstream import stream_text
    from tinyllm.tokenizer import STOP_IDS

    ids = tok.prompt_ids(prompt)
    cfg = model.config
    # Learned positions end with the context, and generation with them (`generate`): a prompt that
    # filled it got one token. Like chat, keep room for the continuation, up to half the context.
    keep = cfg.block_size - min(max_new_tokens, cfg.block_size // 2)
    if cfg.pos_emb == "learned" and len(ids) > keep:
        warnings.warn(f"the prompt's {len(ids)} tokens and --max-new-tokens {max_new_tokens} do not fit the "
                      f"model's context of {cfg.block_size} tokens: keeping the prompt's last {keep}", stacklevel=2)
        ids = ids[-keep:]
    return stream_text(tok, generate(model, ids, max_new_tokens, stop_ids=STOP_IDS, **sampling))

