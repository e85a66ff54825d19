"""One exception type for mistakes a user can fix.

Library code raises `UserError` with a message that names the file, field or flag and says how to
fix it; the CLI prints it as one line and exits with status 2. Anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (file, flag, config), not a bug in tinyllm."""
