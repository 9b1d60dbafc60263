"""The chart's PrometheusRule (metrics.prometheusRule): every expression checked by Prometheus's own
`promtool check rules`, and each alert made to fire (and not to fire) by `promtool test rules` on
series shaped like those the operator and the controllers serve (operator/selfpruner_operator/metrics.py,
pruner_image/selfpruner/cluster/metrics.py). promtool comes with Debian's `prometheus` package, the
one tests/prometheus_server.py runs."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from test_chart import ALL_FEATURES, CHART, HELM, NAMESPACE, RELEASE

PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if os.access("/usr/bin/promtool", os.X_OK) else None)
pytestmark = [
    pytest.mark.skipif(not HELM.exists(), reason=f"{HELM} is absent (run `make tools/bin/helm`)"),
    pytest.mark.skipif(PROMTOOL is None and not os.environ.get("CI"),
                       reason="no promtool: `make prometheus` (apt-get install prometheus)"),
]
ALERTS = ["SelfprunerPruneJobFailed", "SelfprunerPruneJobsPending", "SelfprunerEvaluationsFailing"]


def rule(*args: str) -> dict:
    out = subprocess.run([str(HELM), "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                          "--set", "metrics.prometheusRule.enabled=true", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (found,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "PrometheusRule"]
    return found


def promtool(*args: str) -> str:
    out = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def rules_file(tmp_path, prometheus_rule: dict, annotations: bool = True):
    """The PrometheusRule's groups as the Prometheus rule file prometheus-operator writes from it."""
    groups = prometheus_rule["spec"]["groups"]
    if not annotations:  # promtool test compares annotations too; their text is checked by `check rules`
        groups = [{**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
                  for g in groups]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    return path


def test_off_by_default():
    out = subprocess.run([str(HELM), "template", RELEASE, str(CHART)], capture_output=True, text=True, timeout=60)
    assert "PrometheusRule" not in out.stdout


@pytest.mark.parametrize("values", [[], ["-f", str(ALL_FEATURES)]], ids=["defaults", "all-features"])
def test_promtool_accepts_every_rule(tmp_path, values):
    pr = rule(*values)
    assert pr["apiVersion"] == "monitoring.coreos.com/v1" and pr["metadata"]["namespace"] == NAMESPACE
    (group,) = pr["spec"]["groups"]
    assert [r["alert"] for r in group["rules"]] == ALERTS
    for r in group["rules"]:
        assert r["labels"]["severity"] and {"summary", "description"} <= r["annotations"].keys()
    out = promtool("check", "rules", str(rules_file(tmp_path, pr)))
    assert "SUCCESS: 3 rules found" in out, out


def test_the_values_reach_the_rules():
    pr = rule("-f", str(ALL_FEATURES))
    assert pr["metadata"]["labels"]["release"] == "prometheus"  # for the Prometheus's ruleSelector
    rules = {r["alert"]: r for r in pr["spec"]["groups"][0]["rules"]}
    assert rules["SelfprunerPruneJobsPending"]["for"] == "1h"
    evals = rules["SelfprunerEvaluationsFailing"]
    assert evals["for"] == "10m" and evals["labels"]["severity"] == "critical"
    assert evals["expr"].count("[30m]") == 2 and evals["expr"].rstrip().endswith("> 0.5")
    off = rule("--set", "metrics.prometheusRule.alerts.prunejobsPending.enabled=false")
    assert [r["alert"] for r in off["spec"]["groups"][0]["rules"]] == [ALERTS[0], ALERTS[2]]


def test_each_alert_fires_on_the_series_the_code_serves(tmp_path):
    """Series as Prometheus stores them after the chart's monitors scraped them: the operator's keep their
    own `namespace` (honorLabels) beside its target's labels; a controller's get `namespace` from its pod."""
    operator = 'job="sp-selfpruner-metrics", pod="sp-selfpruner-operator-7d9", instance="10.0.0.5:9090"'
    controller = 'job="selfpruner-controller", pod="{p}-controller-0-x", instance="10.0.1.{i}:9090"'
    tests = {"rule_files": [str(rules_file(tmp_path, rule(), annotations=False))],
             "evaluation_interval": "1m",
             "tests": [{
                 "interval": "1m",
                 "input_series": [
                     # team-a: known (0) for a while, then one PruneJob fails
                     {"series": f'selfpruner_prunejobs_failed_total{{namespace="team-a", reason="EvaluationNotStarting", {operator}}}',
                      "values": "0 0 0 0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1"},
                     # team-b: its first PruneJob fails before the first scrape sees the series: it appears at 1
                     {"series": f'selfpruner_prunejobs_failed_total{{namespace="team-b", reason="ControllerLost", {operator}}}',
                      "values": "_ _ _ _ _ 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1"},
                     # team-c: known, never fails
                     {"series": f'selfpruner_prunejobs_failed_total{{namespace="team-c", reason="ControllerLost", {operator}}}',
                      "values": "0x29"},
                     # team-a: one PruneJob Pending for 40 minutes; team-c: Pending 10 minutes, then running
                     {"series": f'selfpruner_prunejobs{{namespace="team-a", phase="Pending", {operator}}}',
                      "values": "1x45"},
                     {"series": f'selfpruner_prunejobs{{namespace="team-c", phase="Pending", {operator}}}',
                      "values": "1x10 0x35"},
                     # team-a/llama: a third of its evaluations fail; team-a/qwen: one in eleven
                     {"series": 'selfpruner_search_evaluations_total{namespace="team-a", prunejob="llama", outcome="ok", '
                                + controller.format(p="llama", i=1) + "}", "values": "0+10x40"},
                     {"series": 'selfpruner_search_evaluations_total{namespace="team-a", prunejob="llama", outcome="failed", '
                                + controller.format(p="llama", i=1) + "}", "values": "0+5x40"},
                     {"series": 'selfpruner_search_evaluations_total{namespace="team-a", prunejob="qwen", outcome="ok", '
                                + controller.format(p="qwen", i=2) + "}", "values": "0+10x40"},
                     {"series": 'selfpruner_search_evaluations_total{namespace="team-a", prunejob="qwen", outcome="failed", '
                                + controller.format(p="qwen", i=2) + "}", "values": "0+1x40"},
                 ],
                 "alert_rule_test": [
                     {"eval_time": "4m", "alertname": "SelfprunerPruneJobFailed", "exp_alerts": []},
                     {"eval_time": "7m", "alertname": "SelfprunerPruneJobFailed", "exp_alerts": [
                         {"exp_labels": {"severity": "warning", "namespace": "team-a", "reason": "EvaluationNotStarting"}},
                         {"exp_labels": {"severity": "warning", "namespace": "team-b", "reason": "ControllerLost"}}]},
                     # the window (15m) has passed: no longer firing
                     {"eval_time": "25m", "alertname": "SelfprunerPruneJobFailed", "exp_alerts": []},
                     {"eval_time": "20m", "alertname": "SelfprunerPruneJobsPending", "exp_alerts": []},
                     {"eval_time": "35m", "alertname": "SelfprunerPruneJobsPending", "exp_alerts": [
                         {"exp_labels": {"severity": "warning", "namespace": "team-a"}}]},
                     {"eval_time": "10m", "alertname": "SelfprunerEvaluationsFailing", "exp_alerts": []},
                     {"eval_time": "35m", "alertname": "SelfprunerEvaluationsFailing", "exp_alerts": [
                         {"exp_labels": {"severity": "warning", "namespace": "team-a", "prunejob": "llama"}}]},
                 ],
             }]}
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(tests, width=1000))
    assert "SUCCESS" in promtool("test", "rules", str(path))


def test_the_annotations_render(tmp_path):
    """promtool renders the annotations' templates with the alert's labels and value."""
    pr = rule()
    tests = {"rule_files": [str(rules_file(tmp_path, pr))], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": 'selfpruner_prunejobs{namespace="team-a", phase="Pending"}', "values": "2x40"}],
        "alert_rule_test": [{"eval_time": "35m", "alertname": "SelfprunerPruneJobsPending", "exp_alerts": [{
            "exp_labels": {"severity": "warning", "namespace": "team-a"},
            "exp_annotations": {
                "summary": "PruneJobs stay Pending in namespace team-a",
                "description": "2 PruneJob(s) in namespace team-a have been Pending for 30m: the operator has not "
                               "moved them on; see its log and the PruneJobs' conditions."}}]}]}]}
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(tests, width=1000))
    assert "SUCCESS" in promtool("test", "rules", str(path))
