"""Quiet the Hugging Face libraries while tinyllm reads through them.

Why: `datasets` and `huggingface_hub` log every retry and failure on stderr before they raise
(ten "Retrying in 8s" lines when the hub is unreachable, a "Failed to load JSON" line for a bad
file), and `datasets` draws progress bars for a local file that loads in a moment. The command's
own error then said it again in its one line. Inside `quiet_hub()` their loggers say nothing below
CRITICAL; what went wrong reaches the user once, in tinyllm's message. Download progress bars stay
unless `progress_bars=False` (a local file).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

_LOGGERS = ("datasets", "huggingface_hub")


@contextlib.contextmanager
def quiet_hub(progress_bars: bool = True) -> Iterator[None]:
    import datasets  # its first import sets its loggers' levels: it must come before ours

    levels = {lg: lg.level for lg in map(logging.getLogger, _LOGGERS)}
    bars = datasets.is_progress_bar_enabled()
    for lg in levels:
        lg.setLevel(logging.CRITICAL)
    if not progress_bars:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        for lg, level in levels.items():
            lg.setLevel(level)
        if bars and not progress_bars:
            datasets.enable_progress_bars()
