"""One exception type for input a user can fix.

The CLI turns a `UserError` into a single line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message says what to fix, in one line."""
