"""The operator's series: PruneJobs by namespace and phase, and the PruneJobs that finished, counted
once each, by namespace (and the Failed condition's reason, a closed set)."""

from __future__ import annotations

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client import REGISTRY, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from selfpruner.cluster import status as st  # noqa: E402
from selfpruner_operator import metrics  # noqa: E402


def samples(name: str, **labels) -> dict:
    """{labels of each sample of series `name` that has `labels`: value}."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(name: str, **labels) -> float | None:
    found = [v for k, v in samples(name, **labels).items() if dict(k) == labels]
    return found[0] if found else None


def test_prunejobs_by_namespace_and_phase():
    metrics.record_phase("team-a/x", "Running")
    metrics.record_phase("team-a/y", "Pending")
    metrics.record_phase("team-b/x", "Running")
    assert value("selfpruner_prunejobs", namespace="team-a", phase="Running") == 1
    assert value("selfpruner_prunejobs", namespace="team-a", phase="Pending") == 1
    assert value("selfpruner_prunejobs", namespace="team-a", phase="Failed") == 0  # every phase, 0 for none
    assert value("selfpruner_prunejobs", namespace="team-b", phase="Running") == 1
    metrics.record_phase("team-a/y", "Running")
    assert value("selfpruner_prunejobs", namespace="team-a", phase="Running") == 2
    assert value("selfpruner_prunejobs", namespace="team-a", phase="Pending") == 0
    # a namespace with no PruneJob left has no series (not zeros for ever)
    metrics.record_phase("team-b/x", None)
    assert samples("selfpruner_prunejobs", namespace="team-b") == {}
    assert value("selfpruner_prunejobs", namespace="team-a", phase="Running") == 2
    assert {dict(k)["phase"] for k in samples("selfpruner_prunejobs", namespace="team-a")} == set(st.PHASES)


def test_finished_prunejobs_are_counted_once_by_namespace_and_reason():
    metrics.record_phase("team-c/x", "Running")
    # every counter of a namespace exists at 0 from its first PruneJob on: the first failure is an increase
    assert value("selfpruner_prunejobs_succeeded_total", namespace="team-c") == 0
    reasons = {dict(k)["reason"] for k in samples("selfpruner_prunejobs_failed_total", namespace="team-c")}
    assert reasons == {*st.FAILURE_REASONS, st.OTHER_REASON}
    metrics.record_finished("uid-1", "team-c", st.SUCCEEDED, st.OTHER_REASON)
    metrics.record_finished("uid-1", "team-c", st.SUCCEEDED, st.OTHER_REASON)  # seen again: not counted again
    metrics.record_finished("uid-2", "team-c", st.FAILED, "TooManyFailedEvaluations")
    metrics.record_finished("uid-3", "team-c", st.FAILED, "NotAReasonWeWrite")  # bounded: Other
    metrics.record_finished("uid-4", "team-c", st.INVALID, "SpecInvalid")  # Invalid is neither
    assert value("selfpruner_prunejobs_succeeded_total", namespace="team-c") == 1
    assert value("selfpruner_prunejobs_failed_total", namespace="team-c", reason="TooManyFailedEvaluations") == 1
    assert value("selfpruner_prunejobs_failed_total", namespace="team-c", reason=st.OTHER_REASON) == 1
    assert sum(samples("selfpruner_prunejobs_failed_total", namespace="team-c").values()) == 2
    assert not [k for k in samples("selfpruner_prunejobs_failed_total") if dict(k)["reason"] == "NotAReasonWeWrite"]
    # a deleted PruneJob is forgotten (a new one of the same name has another uid anyway)
    metrics.forget("uid-1")
    assert "uid-1" not in metrics._finished


def test_labels_are_bounded():
    """No series of the operator has a label per PruneJob (the controller pod's series carry `prunejob`)."""
    for family in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        if family.name.startswith("selfpruner_"):
            for s in family.samples:
                assert set(s.labels) <= {"namespace", "phase", "reason", "le"}, (s.name, s.labels)
