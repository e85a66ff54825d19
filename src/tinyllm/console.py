"""What the user's terminal can show.

A progress bar redraws its line with carriage returns: on a terminal that is one live line, but
redirected to a file (nohup, SLURM, CI) every redraw stays, and a long run's log becomes mostly
bar. Bars are therefore drawn only when both streams are terminals (the bar draws on stderr, the
lines it must stay under go to stdout); elsewhere the plain log lines are all that is printed.
"""

from __future__ import annotations

import sys


def interactive() -> bool:
    """True when stdout and stderr are both terminals, so a live progress bar reads well."""
    return all(getattr(f, "isatty", lambda: False)() for f in (sys.stdout, sys.stderr))
