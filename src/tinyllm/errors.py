"""One exception type for mistakes a user can fix.

Library code raises `UserError` with a message that names the file, field or flag and says how to
fix it; the CLI prints it as one line and exits with status 2. Anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (file, flag, config), not a bug in tinyllm."""


class EveryRankError(UserError):
    """A UserError that every torchrun process raises alike, from values they all agreed on (a
    diverged loss is all-reduced): rank 0 alone prints it, so the user reads one line, not one per
    process. An error that one rank may meet alone must stay a plain UserError, or nobody says it."""
