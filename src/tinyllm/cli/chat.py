"""`tinyllm chat`: a conversation with a trained run in the terminal.

Why it is shaped this way: the conversation itself (history, fitting it to the context, streamed
text) is `tinyllm.inference.chat.ChatSession`; this module is only the terminal around it. Lines
are read with `input()` (with line editing and history when readline is available). Ctrl-C
arrives as KeyboardInterrupt wherever the program is: during an answer it closes the answer's
generator, which keeps the part already shown in the history, and returns to the prompt; at the
prompt it abandons the line. Ctrl-D (end of input) and /exit leave with status 0, so piping a
file of questions into `tinyllm chat` works too.

Python turns Ctrl-C into KeyboardInterrupt only if SIGINT was at its default when the process
started. A shell script's background job (`cmd &`, which is how some CI runners and tools start
commands) starts with SIGINT ignored, and every Ctrl-C typed into the chat was then lost. On a
terminal, Ctrl-C is one of this program's keys, so it takes SIGINT back (`_take_ctrl_c`).
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings

from tinyllm.cli.run_args import add_quantize_argument, add_run_arguments, load_run
from tinyllm.errors import UserError

USER_PROMPT = "you> "
ANSWER_PREFIX = "model> "
COMMANDS = "/reset starts a new conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="talk to a trained run in the terminal",
        description="A multi-turn conversation with RUN_DIR's newest checkpoint (or --checkpoint). Answers "
        "are printed as they are generated and end at <|im_end|>. When the conversation outgrows the model's "
        f"context the oldest turns are dropped (the --system message stays). Keys: {COMMANDS}.",
    )
    add_run_arguments(p)
    add_quantize_argument(p)
    p.add_argument("--system", metavar="TEXT", help="a system message, kept at the start of the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="tokens per answer at most (default 256); the history keeps room for min(N, context/2)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="sampling temperature; 0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, metavar="K", help="sample among the K most likely tokens; 0 for all (default 50)")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling: the smallest set reaching probability P (default off)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="random seed, for a repeatable conversation (answer k uses S+k)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tinyllm.inference.chat import ChatSession  # torch: after --help
    from tinyllm.tokenizer import get_tokenizer

    model, _, ckpt = load_run(args, "chat with")
    session = ChatSession(model, get_tokenizer(), system=args.system, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, seed=args.seed)
    if sys.stdin.isatty():
        _enable_line_editing()
        _take_ctrl_c()
    # Piped in, or written to a file, the question reached no terminal next to its prompt: without
    # it the transcript read "you> model> ..." with nothing asked.
    echo = not (sys.stdin.isatty() and sys.stdout.isatty())
    print(f"chatting with {ckpt} ({model.num_params():,} parameters, context {session.context} tokens)")
    print(COMMANDS)
    while True:
        try:
            line = input(USER_PROMPT)
        except EOFError:  # Ctrl-D, or the end of piped input
            print()
            return 0
        except KeyboardInterrupt:  # at the prompt: drop the line, ask again
            print()
            continue
        if echo:
            print(line)
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(new conversation)")
        elif text.startswith("/") and " " not in text:
            print(f"unknown command {text}: {COMMANDS}")
        elif text:
            try:
                _answer(session, text)
            except KeyboardInterrupt:  # Ctrl-C before the answer began streaming, or a second one
                print(" [stopped]")


def _answer(session, text: str) -> None:
    """Print the answer to `text` as it streams; Ctrl-C stops it and returns."""
    try:
        pieces = session.reply(text)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if session.dropped:
                print(f"(dropped the {session.dropped} oldest message{'s' if session.dropped > 1 else ''} to fit "
                      f"the model's context of {session.context} tokens)")
            sys.stdout.write(ANSWER_PREFIX)
            sys.stdout.flush()
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pieces.close()  # records the part shown so far
            sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    for w in caught:
        print(f"(note: {w.message})", file=sys.stderr)


def _take_ctrl_c() -> None:
    """Ctrl-C raises KeyboardInterrupt here even if this process was started with SIGINT ignored."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _enable_line_editing() -> None:
    """Arrow keys and history at the prompt, where the platform has readline."""
    try:
        import readline  # noqa: F401  (importing it is what makes input() use it)
    except ImportError:
        pass
