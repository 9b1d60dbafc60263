"""Which controller failures are final and which are a lost controller.

A final failure (bad input, a Job that failed for good, a request the API server refuses, a bug)
would happen again in a new controller: it is reported (phase Failed, the reason in a condition
and an Event) and never retried. A transient one (the API server or the store unreachable or
overloaded) fails the pod, and the operator starts a controller that resumes from storage.
"""

from __future__ import annotations

import traceback

from ..errors import UserError
from ..storage import ChecksumMismatch, StorageError
from .kube import JobConflict

TRANSIENT_HTTP = {0, 408, 429, 500, 502, 503, 504}


class Verdict(Exception):
    """A final failure with its reason (a CamelCase word for the status) and message."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def classify(e: BaseException) -> tuple[str, str] | None:
    """(reason, message) for a final failure; None for a transient one."""
    if isinstance(e, Verdict):
        return e.reason, e.message
    if isinstance(e, JobConflict):
        return "JobConflict", str(e)
    if isinstance(e, UserError):  # includes StorageAccessError: no bucket, no credentials
        return "InvalidInput", " ".join(str(e).split())
    if isinstance(e, (ChecksumMismatch, StorageError, ConnectionError, TimeoutError)):
        return None
    status = getattr(e, "status", None)
    if type(e).__name__ == "ApiException" and isinstance(status, int):
        if status in TRANSIENT_HTTP:
            return None
        return "ApiRejected", f"the API server refused a request ({status} {getattr(e, 'reason', '')}): " \
                              f"{_api_message(e)}"
    if type(e).__module__.startswith("urllib3"):
        return None
    return "ControllerError", f"{type(e).__name__}: {e} (at {_where(e)})"


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
