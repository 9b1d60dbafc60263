"""Injectable API-server faults: the next N requests that match answer an error status
(429 with Retry-After, 500, 503, 504, or any code) or lose their connection, so tests can show
how the operator and the controller live through a flaky or overloaded API server.

    cluster.faults.add(code=503, method="PATCH", path_regex=r"/prunejobs/", times=2)
    cluster.faults.add(reset=True, method="GET", path_regex=r"watch=true")

Tests call `add` from their own thread while the server takes faults in its loop thread, so
every access holds a lock."""

from __future__ import annotations

import dataclasses
import re
import threading
from typing import Any

REASONS = {429: ("TooManyRequests", "Too many requests, please try again later."),
           500: ("InternalError", "Internal error occurred: injected fault"),
           503: ("ServiceUnavailable", "The server is currently unable to handle the request"),
           504: ("Timeout", "The server was unable to return a response in the time allotted, but may still be "
                            "processing the request")}


@dataclasses.dataclass
class Fault:
    code: int = 503
    method: str | None = None            # None: any method
    path_regex: str | None = None        # searched in the path and query (`/api/v1/...?watch=true`)
    times: int = 1                       # how many matching requests it answers
    reset: bool = False                  # close the connection without a response
    retry_after: int = 1                 # seconds, for 429
    hits: int = 0                        # requests it answered so far

    def matches(self, method: str, path_qs: str) -> bool:
        if self.method and self.method.upper() != method.upper():
            return False
        return self.path_regex is None or re.search(self.path_regex, path_qs) is not None

    def status(self) -> dict[str, Any]:
        reason, message = REASONS.get(self.code, ("", f"injected fault {self.code}"))
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                                "message": message, "reason": reason, "code": self.code}
        if self.code == 429:
            body["details"] = {"retryAfterSeconds": self.retry_after}
        return body

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.code == 429 else {}


class Faults:
    """The faults waiting for requests (first added, first used)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: list[Fault] = []

    def add(self, code: int = 503, method: str | None = None, path_regex: str | None = None, times: int = 1,
            reset: bool = False, retry_after: int = 1) -> Fault:
        fault = Fault(code, method, path_regex, times, reset, retry_after)
        with self._lock:
            self._waiting.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._waiting.clear()

    def pending(self) -> list[Fault]:
        with self._lock:
            return [f for f in self._waiting if f.hits < f.times]

    def take(self, method: str, path_qs: str) -> Fault | None:
        """The fault that answers this request, if any (counts the hit)."""
        with self._lock:
            for fault in self._waiting:
                if fault.hits < fault.times and fault.matches(method, path_qs):
                    fault.hits += 1
                    if fault.hits >= fault.times:
                        self._waiting.remove(fault)
                    return fault
        return None
