"""Which controller failures are final and which are a lost controller.

A final failure (bad input, a Job that failed for good, a request the API server refuses, a bug)
would happen again in a new controller: it is reported (phase Failed, the reason in a condition
and an Event) and never retried. A transient one (the API server or the store unreachable or
overloaded) fails the pod, and the operator starts a controller that resumes from storage.
"""

from __future__ import annotations

import traceback

from ..errors import UserError
from .kube import ChildConflict, http_status, redact
from .pod_env import is_transient


class Verdict(Exception):
    """A final failure with its reason (a CamelCase word for the status) and message."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def classify(e: BaseException) -> tuple[str, str] | None:
    """(reason, message) for a final failure; None for a transient one. API errors are told apart
    by their HTTP status (429 and 5xx are transient), never by the exception's class name."""
    if isinstance(e, Verdict):
        return e.reason, redact(e.message)
    if isinstance(e, ChildConflict):
        return "JobConflict", str(e)
    if isinstance(e, UserError):  # includes StorageAccessError: no bucket, no credentials
        return "InvalidInput", redact(" ".join(str(e).split()))
    if is_transient(e):  # the store or the API server unreachable or overloaded
        return None
    status = http_status(e)
    if status is not None:
        return "ApiRejected", redact(f"the API server refused a request ({status} {getattr(e, 'reason', '')}): "
                                     f"{_api_message(e)}")
    return "ControllerError", redact(f"{type(e).__name__}: {e} (at {_where(e)})")


def _api_message(e) -> str:
    import json

    try:
        return json.loads(e.body).get("message", "")[:500]
    except (TypeError, ValueError, AttributeError):
        return str(getattr(e, "body", ""))[:500]


def _where(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno}"
