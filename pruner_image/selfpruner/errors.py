"""One exception type for input a user can fix.

The CLI turns a `UserError` into a single line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message says what to fix, in one line."""


class LLMUnavailable(UserError):
    """The LLM endpoint of an llm-evolution search answers nothing usable: nothing listens, the key
    or the model is refused, or whole rounds of calls fail. Without the LLM the search would go on
    as a classical one while reporting itself as llm-evolution, so it stops, naming the endpoint
    (never the key) and its last error; the checkpoint lets the same run resume once it is fixed."""
