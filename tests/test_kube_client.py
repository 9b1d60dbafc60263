"""The one client layer (selfpruner.cluster.kube): which API errors are retried, how a final one is
classified, and that no secret's value reaches a status or an event. The errors are the kubernetes
client's own exception classes; against the emulated API server, faults are injected in
tests/test_operator_faults.py."""

from __future__ import annotations

import pytest
import urllib3
from kubernetes.client.exceptions import ApiException, ForbiddenException, ServiceException

from selfpruner.cluster import failures, kube


class Flaky:
    """A call that fails with the given errors first, then answers."""

    def __init__(self, *errors):
        self.errors, self.calls = list(errors), 0

    def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def throttled(retry_after: str | None = None) -> ApiException:
    e = ApiException(status=429, reason="Too Many Requests")
    e.headers = {"Retry-After": retry_after} if retry_after else {}
    return e


def test_throttling_server_errors_and_resets_are_retried_with_backoff():
    slept: list[float] = []
    flaky = Flaky(throttled(), ServiceException(status=503, reason="Service Unavailable"),
                  urllib3.exceptions.ProtocolError("Connection aborted", ConnectionResetError(104, "reset")),
                  ConnectionResetError(104, "reset"))
    assert kube.call(flaky, sleep=slept.append) == "ok" and flaky.calls == 5
    assert len(slept) == 4 and all(0 < s <= kube.MAX_BACKOFF for s in slept)
    assert slept[2] > slept[0] / 2, "the backoff grows"


def test_a_retry_after_header_is_honoured():
    slept: list[float] = []
    assert kube.call(Flaky(throttled("7")), sleep=slept.append) == "ok"
    assert 3.5 <= slept[0] <= 7


def test_a_request_the_server_refuses_is_not_retried():
    for error in (ApiException(status=422, reason="Unprocessable Entity"), ForbiddenException(status=403),
                  ApiException(status=404, reason="Not Found")):
        flaky = Flaky(error)
        with pytest.raises(ApiException):
            kube.call(flaky, sleep=lambda s: None)
        assert flaky.calls == 1


def test_retries_are_bounded():
    flaky = Flaky(*[ServiceException(status=500)] * 20)
    with pytest.raises(ServiceException):
        kube.call(flaky, retries=3, sleep=lambda s: None)
    assert flaky.calls == 4


def test_api_errors_are_classified_by_status_not_by_class_name():
    """The client raises subclasses of ApiException (ServiceException for 5xx, ForbiddenException,
    ...): a 503 is a lost controller to restart, never a final failure."""
    for transient in (ServiceException(status=503), ServiceException(status=500), throttled(),
                      ApiException(status=504), urllib3.exceptions.MaxRetryError(None, "/", "refused"),
                      ConnectionRefusedError(111, "refused")):
        assert failures.classify(transient) is None, transient
    reason, message = failures.classify(ForbiddenException(status=403, reason="Forbidden"))
    assert reason == "ApiRejected" and "403" in message
    assert failures.classify(ApiException(status=422, reason="Invalid"))[0] == "ApiRejected"


def test_no_secret_value_reaches_a_status_or_an_event(monkeypatch):
    monkeypatch.setenv("SELFPRUNER_LLM_API_KEY", "sk-very-secret-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    error = ValueError("Invalid endpoint: sk-very-secret-key (with wJalrXUtnFEMI/K7MDENG)")
    reason, message = failures.classify(error)
    assert "sk-very-secret-key" not in message and "wJalrXUtnFEMI" not in message and "***" in message
    verdict = failures.Verdict("InvalidInput", "the store said: wJalrXUtnFEMI/K7MDENG is wrong")
    assert "wJalrXUtnFEMI" not in failures.classify(verdict)[1]
