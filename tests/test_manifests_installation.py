"""The installation's pod settings (the chart's `pruner` values, SELFPRUNER_PODS) and a PruneJob's Kueue
labels, as manifests.py puts them into the controller, evaluation and finalize Jobs; policy.check_job
accepts the Jobs built with them. The chart's side: test_chart.py."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest

from selfpruner.cluster import manifests, policy
from selfpruner.errors import UserError
from test_manifests import IMAGE, K8S, prunejob

PODS = {
    "imagePullSecrets": [{"name": "registry-creds"}],
    "imagePullPolicy": "Always",
    "gpuResource": "amd.com/gpu",
    "runtimeClassName": "nvidia",
    "podLabels": {"sidecar.istio.io/inject": "false", "team": "ml"},
    "podAnnotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
    "controller": {"resources": {"requests": {"cpu": "2", "memory": "3Gi"}, "limits": {"memory": "6Gi"}}},
    "podSecurityContext": {"runAsUser": 1000680000, "runAsGroup": 0, "fsGroup": 1000680000},
}
INSTALLATION = {"storage": {"uri": "s3://selfpruner/runs", "endpointURL": "http://minio:9000",
                            "credentialsSecret": {"name": "s3-creds"}}}
POLICY = {"allowedSecrets": ["llm"], "allowedWorkloadPriorityClasses": ["batch-low"]}


def texts() -> dict:
    """Texts of its own (a cluster refuses the demo texts: test_policy_cluster_inputs.py)."""
    return {"calibration": {"text": "s3://texts/c.txt"},
            "fitness": {"text": "s3://texts/f.txt", "heldOutText": "s3://texts/h.txt"}}


def job_pod(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def jobs(pj: dict, pods: dict | None) -> dict:
    return {"controller": manifests.controller_job(pj, image=IMAGE, service_account="sa", policy=POLICY,
                                                   installation=INSTALLATION, pods=pods),
            "evaluation": manifests.evaluation_job(pj, generation=1, shards=2, image=IMAGE, batch="0123abcd45",
                                                   pods=pods),
            "finalize": manifests.finalize_job(pj, image=IMAGE, pods=pods)}


def with_labels(pj: dict, labels: dict) -> dict:
    return {**pj, "metadata": {**pj["metadata"], "labels": labels}}


def test_each_setting_lands_where_kubernetes_reads_it():
    pj = prunejob(evaluator={"gpusPerPod": 4}, **texts())
    built = jobs(pj, PODS)
    for name, job in built.items():
        kubernetes_validate.validate(job, K8S, strict=True)
        policy.check_job(job, pj["spec"], POLICY, INSTALLATION, IMAGE)
        pod, meta = job_pod(job), job["spec"]["template"]["metadata"]
        assert pod["imagePullSecrets"] == [{"name": "registry-creds"}], name
        assert [c["imagePullPolicy"] for c in pod["containers"]] == ["Always"], name
        assert PODS["podLabels"].items() <= meta["labels"].items(), name
        assert meta["annotations"] == PODS["podAnnotations"], name
        assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"},
                                          **PODS["podSecurityContext"]}, name
        (c,) = pod["containers"]
        assert c["securityContext"] == manifests.container_security(), name
        # the installation's labels are on the pods, not on the Job (nothing selects Jobs by them)
        assert "sidecar.istio.io/inject" not in job["metadata"]["labels"]
    controller = job_pod(built["controller"])["containers"][0]
    assert controller["resources"] == PODS["controller"]["resources"]
    assert "runtimeClassName" not in job_pod(built["controller"])  # a CPU pod
    for name in ("evaluation", "finalize"):
        pod = job_pod(built[name])
        assert pod["runtimeClassName"] == "nvidia"
        resources = pod["containers"][0]["resources"]
        assert resources["limits"]["amd.com/gpu"] == resources["requests"]["amd.com/gpu"] == 4
        assert "nvidia.com/gpu" not in resources["limits"]


def test_without_settings_the_pods_are_as_before_and_fix_no_uid():
    pj = prunejob(**texts())
    for name, job in jobs(pj, {}).items():
        pod = job_pod(job)
        assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}, name
        assert not {"imagePullSecrets", "runtimeClassName"} & pod.keys(), name
        assert "annotations" not in job["spec"]["template"]["metadata"], name
        assert "imagePullPolicy" not in pod["containers"][0], name
    built = jobs(pj, {})
    assert job_pod(built["controller"])["containers"][0]["resources"] == manifests.CONTROLLER_RESOURCES
    assert job_pod(built["evaluation"])["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_a_cpu_only_evaluation_pod_gets_no_runtime_class_and_no_gpu():
    pj = prunejob(evaluator={"gpusPerPod": 0}, **texts())
    pod = job_pod(manifests.evaluation_job(pj, generation=0, shards=1, image=IMAGE, batch="b", pods=PODS))
    assert "runtimeClassName" not in pod
    assert "amd.com/gpu" not in pod["containers"][0]["resources"]["limits"]


def test_selfprunes_own_labels_win_over_the_installations():
    """Selectors (the controller PodMonitor, the children's uid selector) rely on them."""
    pj = prunejob(**texts())
    hostile = {**PODS, "podLabels": {manifests.COMPONENT_LABEL: "evaluator", manifests.UID_LABEL: "x",
                                     "app.kubernetes.io/name": "other"}}
    for name, job in jobs(pj, hostile).items():
        labels = job["spec"]["template"]["metadata"]["labels"]
        assert labels == manifests.labels(pj, labels[manifests.COMPONENT_LABEL],
                                          **{k: v for k, v in labels.items() if k.startswith("selfpruner.io/")
                                             and k not in (manifests.UID_LABEL, manifests.PRUNEJOB_LABEL)})
        assert labels[manifests.UID_LABEL] == pj["metadata"]["uid"]
    assert jobs(pj, hostile)["controller"]["spec"]["template"]["metadata"]["labels"][manifests.COMPONENT_LABEL] \
        == "controller"


def test_the_settings_come_from_the_environment_and_go_on_to_the_controller(monkeypatch):
    """The operator is given SELFPRUNER_PODS by the chart; the controller Job carries it on, and the
    controller's evaluation Jobs read it there: the same settings at every level."""
    pj = prunejob(evaluator={"gpusPerPod": 1}, **texts())
    monkeypatch.setenv(manifests.PODS_ENV, json.dumps(PODS))
    controller = manifests.controller_job(pj, image=IMAGE, service_account="sa")
    env = {e["name"]: e.get("value") for e in job_pod(controller)["containers"][0]["env"]}
    assert json.loads(env[manifests.PODS_ENV]) == PODS
    assert job_pod(controller)["imagePullSecrets"] == PODS["imagePullSecrets"]
    # inside the controller pod: its environment is what the Job gave it
    monkeypatch.setenv(manifests.PODS_ENV, env[manifests.PODS_ENV])
    evaluation = manifests.evaluation_job(pj, generation=0, shards=1, image=IMAGE, batch="b")
    assert job_pod(evaluation)["runtimeClassName"] == "nvidia"
    assert job_pod(evaluation)["containers"][0]["resources"]["limits"]["amd.com/gpu"] == 1
    monkeypatch.delenv(manifests.PODS_ENV)
    plain = manifests.finalize_job(pj, image=IMAGE)
    assert "runtimeClassName" not in job_pod(plain)


@pytest.mark.parametrize("bad", ["{x", "[1]", '{"podLabels": ["a"]}', '{"imagePullSecrets": {"name": "x"}}'])
def test_a_bad_settings_value_stops_with_one_line_naming_the_chart_value(bad):
    with pytest.raises(SystemExit) as e:
        manifests.pod_settings({manifests.PODS_ENV: bad})
    assert "pruner" in str(e.value) and "\n" not in str(e.value)


# --- Kueue -----------------------------------------------------------------------------------------

QUEUE, PRIORITY = manifests.KUEUE_LABEL, policy.KUEUE_PRIORITY_LABEL


def test_the_prunejobs_kueue_labels_go_to_its_gpu_jobs_only():
    pj = with_labels(prunejob(**texts()), {QUEUE: "team-a", PRIORITY: "batch-low", "team": "a"})
    built = jobs(pj, {})
    for name in ("evaluation", "finalize"):
        labels = built[name]["metadata"]["labels"]
        assert labels[QUEUE] == "team-a" and labels[PRIORITY] == "batch-low", name
        assert "team" not in labels
        policy.check_job(built[name], pj["spec"], POLICY, INSTALLATION, IMAGE)
    # the controller holds no GPU and must run to manage the queued Jobs: never queued itself
    assert not {QUEUE, PRIORITY} & built["controller"]["metadata"]["labels"].keys()
    # ...but hands the labels on, so the GPU Jobs it creates carry them
    env = {e["name"]: e.get("value") for e in job_pod(built["controller"])["containers"][0]["env"]}
    document = json.loads(env["SELFPRUNER_PRUNEJOB"])
    assert document["metadata"]["labels"] == {QUEUE: "team-a", PRIORITY: "batch-low"}
    from_controller = manifests.evaluation_job(document, generation=0, shards=1, image=IMAGE, batch="b", pods={})
    assert from_controller["metadata"]["labels"][QUEUE] == "team-a"
    assert from_controller["metadata"]["labels"][PRIORITY] == "batch-low"


def test_spec_queue_name_wins_over_the_label_and_no_labels_means_none():
    pj = with_labels(prunejob(queueName="from-spec", **texts()), {QUEUE: "from-label"})
    assert jobs(pj, {})["evaluation"]["metadata"]["labels"][QUEUE] == "from-spec"
    plain = jobs(prunejob(**texts()), {})
    assert not {QUEUE, PRIORITY} & plain["evaluation"]["metadata"]["labels"].keys()
    env = {e["name"]: e.get("value") for e in job_pod(plain["controller"])["containers"][0]["env"]}
    assert "labels" not in json.loads(env["SELFPRUNER_PRUNEJOB"])["metadata"]


def test_tenant_a_names_a_workload_priority_the_installation_does_not_allow():
    """A Kueue priority preempts other tenants' workloads: only the chart's allowedWorkloadPriorityClasses.
    The controller Job carries the PruneJob it will build GPU Jobs from, so the operator's check of it
    refuses the PruneJob at admission; a GPU Job with it is refused where the controller creates it."""
    pj = with_labels(prunejob(**texts()), {PRIORITY: "system-critical"})
    built = jobs(pj, {})
    for name in ("controller", "evaluation"):
        with pytest.raises(UserError) as e:
            policy.check_job(built[name], pj["spec"], POLICY, INSTALLATION, IMAGE)
        message = str(e.value)
        assert f"label {PRIORITY}='system-critical' is not allowed" in message and "batch-low" in message, message
        assert "\n" not in message
    assert "metadata.labels" in str(pytest.raises(UserError, policy.check_job, built["controller"], pj["spec"],
                                                  POLICY, INSTALLATION, IMAGE).value)
    allowed = with_labels(prunejob(**texts()), {PRIORITY: "batch-low"})
    for job in jobs(allowed, {}).values():
        policy.check_job(job, allowed["spec"], POLICY, INSTALLATION, IMAGE)
