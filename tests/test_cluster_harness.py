"""Smoke tests of the test-side cluster (tests/k8s/): kubectl, the kubernetes client,
kopf and the fake kubelet against kmock's emulator. See tests/README.md."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

from ports import free_port
from k8s import Cluster, ClusterApiError, Kubelet, find_kubectl

pytestmark = pytest.mark.skipif(find_kubectl() is None, reason="no kubectl: run `make tools/bin/kubectl`")

PRUNEJOB = textwrap.dedent("""\
    apiVersion: selfpruner.io/v1alpha1
    kind: PruneJob
    metadata:
      name: demo
      labels: {team: search}
    spec:
      model: {source: demo}
      target: {ratio: 0.2}
    """)


@pytest.fixture()
def cluster(tmp_path):
    with Cluster(tmp_path / "cluster") as cluster:
        yield cluster
        assert not cluster.emulator.server_errors, cluster.emulator.server_errors[-1]


@pytest.fixture()
def kubelet(cluster, tmp_path):
    def command_map(argv):
        # the image's entrypoint -> the local interpreter, as the operator tests will map selfpruner
        return [sys.executable, *argv[1:]] if argv and argv[0] == "python" else argv

    with Kubelet(cluster, command_map=command_map, logs_dir=tmp_path / "pods") as kubelet:
        yield kubelet
        print(kubelet.dump_logs())      # pytest shows it when the test fails
        assert not kubelet.errors, kubelet.errors


def _client(cluster):
    import kubernetes
    return kubernetes.config.new_client_from_config(config_file=str(cluster.kubeconfig))



def test_kubectl_finds_the_core_kinds(cluster, kubelet, tmp_path):
    """kubectl maps a core kind through /api/v1's discovery (`groupVersion: v1`); with kmock's "/v1"
    it found none, `kubectl apply` of a Secret failed and `kubectl get pods` listed PodMetrics."""
    (tmp_path / "s.yaml").write_text("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {k: v}\n")
    assert "secret/s created" in cluster.kubectl("apply", "-f", str(tmp_path / "s.yaml")).stdout
    assert cluster.kubectl("get", "secrets", "-o", "name").stdout.split() == ["secret/s"]
    cluster.create({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"},
                    "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [
                        {"name": "c", "image": "i", "command": ["python", "-c", "pass"]}]}}}})
    cluster.wait_for(lambda: (cluster.get("jobs", "j").get("status") or {}).get("succeeded"), 30, message="the Job")
    pods = cluster.kubectl("get", "pods", "-o", "json").stdout
    assert [p["metadata"]["labels"]["job-name"] for p in json.loads(pods)["items"]] == ["j"]


def test_kubectl_and_client_see_api_server_semantics(cluster, tmp_path):
    import kubernetes

    cluster.kubectl("apply", "-f", "crds/prunejob.yaml")
    (tmp_path / "pj.yaml").write_text(PRUNEJOB)
    assert "created" in cluster.kubectl("apply", "-f", str(tmp_path / "pj.yaml")).stdout
    assert "unchanged" in cluster.kubectl("apply", "-f", str(tmp_path / "pj.yaml")).stdout

    table = cluster.kubectl("get", "prunejobs").stdout
    assert table.split()[:3] == ["NAME", "PHASE", "REASON"] and "demo" in table
    assert "0.2" in cluster.kubectl("get", "prunejobs", "-o", "wide").stdout  # Ratio: a wide column
    assert "demo" in cluster.kubectl("get", "pj", "-l", "team=search", "-o", "name").stdout
    assert cluster.kubectl("get", "pj", "-l", "team=other", "-o", "name").stdout.strip() == ""

    api = kubernetes.client.CustomObjectsApi(_client(cluster))
    args = ("selfpruner.io", "v1alpha1", "default", "prunejobs")
    pj = api.get_namespaced_custom_object(*args, "demo")
    meta = pj["metadata"]
    assert meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"] and meta["generation"] == 1

    # The status subresource writes only status; the generation stays.
    st = api.patch_namespaced_custom_object_status(*args, "demo", {"status": {"phase": "Running"},
                                                                  "spec": {"target": {"ratio": 0.9}}})
    assert st["status"] == {"phase": "Running"} and st["spec"]["target"]["ratio"] == 0.2
    assert st["metadata"]["generation"] == 1
    assert int(st["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    # The main resource never writes status; a spec change bumps the generation (suspend: the CRD's
    # transition rules refuse a new target once the search started).
    main = api.patch_namespaced_custom_object(*args, "demo", {"spec": {"suspend": True},
                                                             "status": {"phase": "Hacked"}})
    assert main["status"] == {"phase": "Running"} and main["metadata"]["generation"] == 2
    # A no-op patch changes nothing, not even the resourceVersion.
    same = api.patch_namespaced_custom_object(*args, "demo", {"spec": {"suspend": True}})
    assert same["metadata"]["resourceVersion"] == main["metadata"]["resourceVersion"]
    assert "Running" in cluster.kubectl("get", "prunejobs").stdout

    # List kind, label selectors, 201/409/422 as the API server answers them.
    listing = api.list_namespaced_custom_object(*args, label_selector="team in (search,infra)")
    assert listing["kind"] == "PruneJobList" and [i["metadata"]["name"] for i in listing["items"]] == ["demo"]
    assert api.list_namespaced_custom_object(*args, label_selector="team!=search")["items"] == []
    body = {"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob", "metadata": {"name": "second"},
            "spec": {"model": {"source": "demo"}, "target": {"ratio": 0.1}}}
    _, code, _ = api.create_namespaced_custom_object_with_http_info(*args, body)
    assert code == 201
    with pytest.raises(kubernetes.client.ApiException) as exc:
        api.create_namespaced_custom_object(*args, body)
    assert exc.value.status == 409
    with pytest.raises(ClusterApiError) as err:
        cluster.patch("prunejobs", "demo", [{"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
                                            {"op": "add", "path": "/metadata/finalizers", "value": ["x"]}],
                      content_type="application/json-patch+json")
    assert err.value.code == 422
    with pytest.raises(ClusterApiError) as err:
        cluster.patch("prunejobs", "demo", {"metadata": {"resourceVersion": "1"}, "spec": {"x": 1}})
    assert err.value.code == 409

    # Watch streams resume from a resourceVersion and honour label selectors.
    from kubernetes import watch
    rv = listing["metadata"]["resourceVersion"]
    events = []
    for event in watch.Watch().stream(api.list_namespaced_custom_object, *args, resource_version=rv,
                                      label_selector="team=search", timeout_seconds=1):
        events.append((event["type"], event["object"]["metadata"]["name"]))
    assert events == []  # "second" has no label; nothing happened to "demo" since the list
    api.patch_namespaced_custom_object(*args, "second", {"metadata": {"labels": {"team": "search"}}})
    for event in watch.Watch().stream(api.list_namespaced_custom_object, *args, resource_version=rv,
                                      label_selector="team=search", timeout_seconds=1):
        events.append((event["type"], event["object"]["metadata"]["name"]))
    assert events == [("ADDED", "second")]  # entering the selection is ADDED, as in Kubernetes


def test_kopf_operator_and_kubelet(cluster, kubelet, tmp_path):
    operator = tmp_path / "operator.py"
    operator.write_text(textwrap.dedent("""\
        import logging, sys
        import kopf, kubernetes

        @kopf.on.startup()
        def configure(settings, **_):
            settings.posting.level = logging.INFO
            settings.watching.server_timeout = 30

        @kopf.on.create("selfpruner.io", "v1alpha1", "prunejobs")
        def created(body, name, namespace, **_):
            kubernetes.config.load_kube_config()
            job = {
                "apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": f"{name}-hello", "labels": {"selfpruner.io/prunejob": name}},
                "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [
                    {"name": "main", "image": "selfpruner:dev",
                     "command": ["python", "-c", "print('hi')"]}]}}},
            }
            kopf.adopt(job)
            kubernetes.client.BatchV1Api().create_namespaced_job(namespace, job)
            kopf.info(body, reason="JobCreated", message=f"created job {name}-hello")
            return {"job": f"{name}-hello"}

        @kopf.on.event("batch", "v1", "jobs", labels={"selfpruner.io/prunejob": kopf.PRESENT})
        def job_changed(event, body, namespace, **_):
            done = [c["type"] for c in body.get("status", {}).get("conditions", []) if c["status"] == "True"]
            if "Complete" in done and event["type"] != "DELETED":
                kubernetes.config.load_kube_config()
                owner = body["metadata"]["labels"]["selfpruner.io/prunejob"]
                kubernetes.client.CustomObjectsApi().patch_namespaced_custom_object_status(
                    "selfpruner.io", "v1alpha1", namespace, "prunejobs", owner, {"status": {"phase": "Succeeded"}})

        @kopf.on.delete("selfpruner.io", "v1alpha1", "prunejobs")
        def deleted(name, **_):
            pass
        """))
    port = free_port()
    log = open(tmp_path / "kopf.log", "wb")
    kopf_proc = subprocess.Popen(
        [sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", "default",
         "--liveness", f"http://127.0.0.1:{port}/healthz", str(operator)],
        env=cluster.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def alive():
            if kopf_proc.poll() is not None:
                raise AssertionError("kopf exited:\n" + (tmp_path / "kopf.log").read_text())
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).status == 200
            except OSError:
                return False
        cluster.wait_for(alive, 30, message="kopf's liveness endpoint")

        (tmp_path / "pj.yaml").write_text(PRUNEJOB)
        cluster.kubectl("apply", "-f", str(tmp_path / "pj.yaml"))
        pj = cluster.get("prunejobs", "demo")

        job = cluster.wait_for(lambda: cluster.get("jobs", "demo-hello"), 20, message="kopf to create the job")
        (owner,) = job["metadata"]["ownerReferences"]
        assert owner["uid"] == pj["metadata"]["uid"] and owner["kind"] == "PruneJob" and owner["controller"]
        assert cluster.list("jobs", labels="selfpruner.io/prunejob=demo")[0]["metadata"]["name"] == "demo-hello"
        assert cluster.list("jobs", labels="selfpruner.io/prunejob=other") == []

        done = kubelet.wait_finished("demo-hello")
        assert [c["type"] for c in done["status"]["conditions"]] == ["SuccessCriteriaMet", "Complete"]
        assert done["status"]["succeeded"] == 1 and done["status"]["completionTime"]
        (pod_log,) = kubelet.logs("demo-hello")
        assert pod_log.read_text().splitlines()[-1] == "hi"

        pj = cluster.wait_for(lambda: (p := cluster.get("prunejobs", "demo")) and
                              p.get("status", {}).get("phase") == "Succeeded" and p, 20,
                              message="the operator to mark the PruneJob Succeeded")
        # kopf writes the handler's result to status.created; the CRD's status does not declare it,
        # so the server prunes it (as a real one does): results must not be read back from there.
        assert "created" not in pj["status"]
        assert pj["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
        cluster.wait_for(lambda: any(e["reason"] == "JobCreated" for e in cluster.events("demo")), 10,
                         message="kopf's event")
        assert "JobCreated" in cluster.kubectl("get", "events").stdout

        # Deletion: kopf releases its finalizer, then the garbage collector deletes the owned Job.
        cluster.kubectl("delete", "prunejob", "demo", "--wait=false")
        cluster.wait_for(lambda: cluster.get("prunejobs", "demo") is None, 20, message="kopf to release the finalizer")
        assert cluster.get("jobs", "demo-hello") is None
    finally:
        kopf_proc.terminate()
        try:
            kopf_proc.wait(10)
        except subprocess.TimeoutExpired:
            kopf_proc.kill()
        log.close()
    kopf_log = (tmp_path / "kopf.log").read_text()
    assert "Traceback" not in kopf_log, kopf_log
    assert "Throttling" not in kopf_log, kopf_log


def _indexed_job(name, script, completions=3, parallelism=3, **spec):
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"completionMode": "Indexed", "completions": completions, "parallelism": parallelism, **spec,
                 "template": {"spec": {"restartPolicy": "Never", "containers": [{
                     "name": "worker", "image": "selfpruner:dev",
                     "command": ["python", "-c", script]}]}}},
    }


def _pods_of(cluster, job_name):
    """The Pod objects the API server holds for a Job (what a reader of pods sees)."""
    return [p for p in cluster.list("pods") if p["metadata"]["labels"].get("job-name") == job_name]


@pytest.mark.parametrize("field, kind, body, message", [
    ("priorityClassName", "priorityclasses", {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                                              "value": 10}, "no PriorityClass with name {} was found"),
    ("runtimeClassName", "runtimeclasses", {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
                                            "handler": "nvidia"}, 'RuntimeClass "{}" not found')])
def test_a_pod_naming_a_class_that_does_not_exist_is_not_created(cluster, kubelet, field, kind, body, message):
    """As the Priority and RuntimeClass admission plugins do: the pod is refused, the Job controller
    says so in a FailedCreate event and the Job waits; once the class exists the pod starts."""
    job = _indexed_job("classy", "pass", completions=1, parallelism=1)
    job["spec"]["template"]["spec"][field] = "gpu-class"
    cluster.create(job)
    event = cluster.wait_for(lambda: [e for e in cluster.events("classy") if e["reason"] == "FailedCreate"], 20,
                             message="a FailedCreate event")[0]
    assert message.format("gpu-class") in event["message"] and not _pods_of(cluster, "classy")
    cluster.create({**body, "metadata": {"name": "gpu-class"}})
    assert kubelet.wait_finished("classy")["status"]["succeeded"] == 1


def test_indexed_job_with_fail_index_rule(cluster, kubelet):
    script = "import os, sys; sys.exit(42 if os.environ['JOB_COMPLETION_INDEX'] == '1' else 0)"
    cluster.create(_indexed_job("idx", script, backoffLimitPerIndex=1, podFailurePolicy={"rules": [
        {"action": "FailIndex", "onExitCodes": {"containerName": "worker", "operator": "In", "values": [42]}}]}))
    job = kubelet.wait_finished("idx")
    status = job["status"]
    assert status["failedIndexes"] == "1" and status["completedIndexes"] == "0,2"
    assert status["succeeded"] == 2 and status["failed"] == 1 and status["active"] == 0
    assert [c["type"] for c in status["conditions"]] == ["FailureTarget", "Failed"]
    assert len(kubelet.logs("idx")) == 3      # FailIndex: index 1 is not retried
    from selfpruner.cluster.kube import Kube, failed_pod_exits
    assert failed_pod_exits(Kube("default", config_file=str(cluster.kubeconfig)), "idx") == {1: [(42, "Error")]}
    # each pod's container status names its container and says how it ended, as a kubelet does
    ended = {p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"]: p["status"]
             for p in _pods_of(cluster, "idx")}
    for index, pod_status in ended.items():
        [cs] = pod_status["containerStatuses"]
        code, reason = (42, "Error") if index == "1" else (0, "Completed")
        assert cs["name"] == "worker" and cs["state"]["terminated"]["exitCode"] == code, cs
        assert cs["state"]["terminated"]["reason"] == reason
        assert pod_status["phase"] == ("Failed" if code else "Succeeded")


def test_preemption_is_ignored_and_env_comes_from_secrets(cluster, kubelet, tmp_path):
    from selfpruner.cluster.kube import Kube, failed_pod_exits

    cluster.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
                    "stringData": {"TOKEN": "s3cret", "REGION": "eu"}})
    marker = tmp_path / "preempted-once"
    script = textwrap.dedent(f"""\
        import os, pathlib, sys, time
        print(os.environ["TOKEN"], os.environ["AWS_REGION"], os.environ["JOB_COMPLETION_INDEX"], flush=True)
        marker = pathlib.Path({str(marker)!r})
        if os.environ["JOB_COMPLETION_INDEX"] == "0" and not marker.exists():
            marker.touch()
            time.sleep(60)
        """)
    job = _indexed_job("pre", script, completions=2, parallelism=1, backoffLimitPerIndex=0, podFailurePolicy={
        "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]})
    job["spec"]["template"]["spec"]["containers"][0]["envFrom"] = [{"secretRef": {"name": "creds"}}]
    job["spec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "AWS_REGION", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "REGION"}}}]
    cluster.create(job)

    cluster.wait_for(lambda: marker.exists() and kubelet.processes("pre").get(0), 20, message="index 0 to run")
    assert kubelet.processes("pre").keys() == {0}          # parallelism 1
    pid = kubelet.preempt("pre", 0)
    done = kubelet.wait_finished("pre")
    assert done["status"]["completedIndexes"] == "0,1" and done["status"]["failed"] == 0
    assert done["status"]["failedIndexes"] == ""
    assert pid not in kubelet.processes("pre").values()
    logs = [p.read_text() for p in kubelet.logs("pre")]
    assert len(logs) == 3 and all("s3cret eu" in text for text in logs)
    # the preempted pod says so, as a real one does, and the controller's reader of failed pods
    # (what a failed shard's reason is built from) does not count it as a failure
    pods = _pods_of(cluster, "pre")
    disrupted = [p for p in pods if any(c["type"] == "DisruptionTarget" and c["status"] == "True"
                                        for c in p["status"]["conditions"])]
    assert len(pods) == 3 and len(disrupted) == 1 and disrupted[0]["status"]["phase"] == "Failed"
    assert disrupted[0]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
    assert failed_pod_exits(Kube("default", config_file=str(cluster.kubeconfig)), "pre") == {}


def test_deleting_a_job_kills_its_pods(cluster, kubelet):
    cluster.create(_indexed_job("sleepy", "import time; time.sleep(60)", completions=2, parallelism=2))
    pids = cluster.wait_for(lambda: len(kubelet.processes("sleepy")) == 2 and kubelet.processes("sleepy"), 20,
                            message="two pods")
    job = cluster.wait_for(lambda: (j := cluster.get("jobs", "sleepy")) and j.get("status", {}).get("active") == 2
                           and j, 10, message="status.active")
    assert job["status"]["startTime"]
    cluster.kubectl("delete", "job", "sleepy")

    def all_dead():
        import os
        for pid in pids.values():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            return False
        return True
    cluster.wait_for(all_dead, 10, message="the pods to be killed")
    assert json.loads(cluster.kubectl("get", "jobs", "-o", "json").stdout)["items"] == []


def test_suspending_a_job_deletes_its_pods_and_says_so_in_a_condition(cluster, kubelet, tmp_path):
    """As the Job controller does: a suspended Job's pods are killed and their objects deleted
    (status.active 0, no stale Running pod for a reader to trust), the Job carries Suspended=True
    (JobSuspended), and on resume Suspended=False (JobResumed) and new pods start."""
    marker = tmp_path / "second-run"
    script = textwrap.dedent(f"""\
        import pathlib, time
        marker = pathlib.Path({str(marker)!r})
        if not marker.exists():
            marker.touch()
            time.sleep(60)
        """)
    cluster.create(_indexed_job("pausy", script, completions=1, parallelism=1))
    first = cluster.wait_for(lambda: kubelet.processes("pausy").get(0) and _pods_of(cluster, "pausy"), 20,
                             message="a running pod")
    cluster.patch("jobs.batch", "pausy", {"spec": {"suspend": True}})

    def suspended():
        job = cluster.get("jobs", "pausy")
        conds = {c["type"]: c for c in (job.get("status") or {}).get("conditions") or []}
        return not _pods_of(cluster, "pausy") and conds.get("Suspended", {}).get("status") == "True" and job
    job = cluster.wait_for(suspended, 20, message="the pods gone and Suspended=True")
    assert job["status"]["active"] == 0 and job["status"].get("failed", 0) == 0  # not a failure
    assert {c["type"]: c for c in job["status"]["conditions"]}["Suspended"]["reason"] == "JobSuspended"
    assert not kubelet.processes("pausy")
    cluster.patch("jobs.batch", "pausy", {"spec": {"suspend": False}})
    done = kubelet.wait_finished("pausy")
    conds = {c["type"]: c for c in done["status"]["conditions"]}
    assert conds["Suspended"]["status"] == "False" and conds["Suspended"]["reason"] == "JobResumed"
    assert conds["Complete"]["status"] == "True" and done["status"]["succeeded"] == 1
    assert first[0]["metadata"]["name"] not in {p["metadata"]["name"] for p in _pods_of(cluster, "pausy")}  # a new pod


def test_resuming_a_job_restarts_its_deadline_even_after_an_index_succeeded(cluster, kubelet, tmp_path):
    """As the Job controller does: a resume resets status.startTime to now, so activeDeadlineSeconds
    counts what the Job ran since, not the time it spent suspended (here: longer than the deadline),
    also when part of the Job had already finished."""
    marker = tmp_path / "second-run"
    script = textwrap.dedent(f"""\
        import os, pathlib, time
        marker = pathlib.Path({str(marker)!r})
        if os.environ['JOB_COMPLETION_INDEX'] == '1' and not marker.exists():
            marker.touch()
            time.sleep(60)
        """)
    cluster.create(_indexed_job("paused-late", script, completions=2, parallelism=1, activeDeadlineSeconds=4))
    cluster.wait_for(lambda: marker.exists(), 20, message="index 1 running after index 0 succeeded")
    before = cluster.get("jobs", "paused-late")["status"]
    assert before["succeeded"] == 1 and before["startTime"]
    cluster.patch("jobs.batch", "paused-late", {"spec": {"suspend": True}})
    cluster.wait_for(lambda: not kubelet.processes("paused-late"), 20, message="the pod killed")
    time.sleep(4.5)   # suspended past the deadline
    cluster.patch("jobs.batch", "paused-late", {"spec": {"suspend": False}})
    done = kubelet.wait_finished("paused-late")
    conds = {c["type"]: c for c in done["status"]["conditions"]}
    assert conds.get("Complete", {}).get("status") == "True", done["status"]
    assert done["status"]["startTime"] > before["startTime"]


def test_a_job_past_its_deadline_kills_and_deletes_its_running_pods(cluster, kubelet):
    """As the Job controller does: DeadlineExceeded ends the Job, and its running pods are killed
    and deleted (no Pod object left Running for a reader to trust); an index that had ended keeps
    its pod, which says how it ended."""
    script = "import os, sys, time; sys.exit(0) if os.environ['JOB_COMPLETION_INDEX'] == '0' else time.sleep(60)"
    cluster.create(_indexed_job("late", script, completions=2, parallelism=2, activeDeadlineSeconds=2))
    done = kubelet.wait_finished("late")
    conds = {c["type"]: c for c in done["status"]["conditions"]}
    assert conds["Failed"]["reason"] == "DeadlineExceeded" and done["status"]["active"] == 0
    assert not kubelet.processes("late")
    pods = cluster.wait_for(lambda: len(ps := _pods_of(cluster, "late")) == 1 and ps, 10,
                            message="only the pod that ended")
    assert pods[0]["status"]["phase"] == "Succeeded"


def test_a_job_of_another_prunejob_is_never_adopted(cluster):
    """Kube.create_job takes a 409 on its own Job as success (idempotent) and on another owner's
    Job as an error: two searches must never share a Job."""
    from selfpruner.cluster import manifests
    from selfpruner.cluster.kube import ChildConflict, Kube

    kube = Kube("default", config_file=str(cluster.kubeconfig))

    def pj(uid):
        return {"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob",
                "metadata": {"name": "sweep", "namespace": "default", "uid": uid},
                "spec": {"model": {"source": "demo"}, "target": {"ratio": 0.3},
                         "storage": {"uri": "s3://bucket/runs"}}}

    ours, theirs = pj("11111111-aaaa-4aaa-8aaa-aaaaaaaaaaaa"), pj("22222222-bbbb-4bbb-8bbb-bbbbbbbbbbbb")
    job = manifests.finalize_job(ours, image="img")
    created = kube.create_job(job)
    assert kube.create_job(job)["metadata"]["uid"] == created["metadata"]["uid"]  # ours: adopted
    stolen = manifests.finalize_job(theirs, image="img")
    stolen["metadata"]["name"] = job["metadata"]["name"]  # the name collision the uid in names prevents
    with pytest.raises(ChildConflict, match="belongs to another owner"):
        kube.create_job(stolen)


def test_a_job_deleted_between_create_and_read_is_created_again_a_bounded_number_of_times(cluster):
    """409 on create then 404 on read: someone deleted the Job in between. Kube creates it again,
    and gives up with a reason when that keeps happening, instead of recursing for ever."""
    from selfpruner.cluster import manifests
    from selfpruner.cluster.kube import Kube

    kube = Kube("default", config_file=str(cluster.kubeconfig))
    pj = {"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob",
          "metadata": {"name": "racy", "namespace": "default", "uid": "33333333-cccc-4ccc-8ccc-cccccccccccc"},
          "spec": {"model": {"source": "demo"}, "target": {"ratio": 0.3}, "storage": {"uri": "s3://bucket/runs"}}}
    job = manifests.finalize_job(pj, image="img")
    name = job["metadata"]["name"]
    post, get = r"/apis/batch/v1/namespaces/default/jobs$", rf"/apis/batch/v1/namespaces/default/jobs/{name}$"
    cluster.faults.add(code=409, method="POST", path_regex=post, times=1)
    cluster.faults.add(code=404, method="GET", path_regex=get, times=1)
    assert kube.create_job(job)["metadata"]["name"] == name  # the second create went through
    kube.delete_job(name)
    cluster.wait_for(lambda: kube.read_job(name) is None, 10, message="the Job to go")
    cluster.faults.add(code=409, method="POST", path_regex=post, times=3)
    cluster.faults.add(code=404, method="GET", path_regex=get, times=3)
    with pytest.raises(RuntimeError, match="3 times in a row; something else keeps creating and deleting"):
        kube.create_job(job)
    assert kube.read_job(name) is None  # nothing was created behind the error


def test_waiting_for_a_job_counts_only_the_time_it_runs(cluster, kubelet):
    """A Job suspended (by the user, or by Kueue while it waits for quota) is not timed; once it
    runs past the timeout the controller gives up with a final verdict, not a lost controller."""
    import threading

    from selfpruner.cluster import manifests
    from selfpruner.cluster.failures import Verdict, classify
    from selfpruner.cluster.k8s_executor import KubernetesExecutor
    from selfpruner.cluster.kube import Kube

    kube = Kube("default", config_file=str(cluster.kubeconfig))
    pj = {"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob",
          "metadata": {"name": "slow", "namespace": "default", "uid": "33333333-cccc-4ccc-8ccc-cccccccccccc"},
          "spec": {"model": {"source": "demo"}, "target": {"ratio": 0.3}, "storage": {"uri": "s3://b/runs"},
                   "evaluator": {"activeDeadlineSeconds": 600}}}
    job = manifests.finalize_job(pj, image="img")
    assert job["spec"]["activeDeadlineSeconds"] == 600  # Kubernetes' own limit, which skips suspended time
    job["spec"]["suspend"] = True
    job["spec"]["template"]["spec"]["containers"][0]["command"] = ["python", "-c", "import time; time.sleep(60)"]
    job["spec"]["template"]["spec"]["containers"][0]["env"] = []
    job["spec"]["template"]["spec"]["containers"][0].pop("envFrom", None)
    name = kube.create_job(job)["metadata"]["name"]
    executor = KubernetesExecutor(pj, store=None, kube=kube, image="img", poll=0.05, timeout=1.0)
    outcome: dict = {}

    def wait():
        try:
            executor._wait(name, lambda: False)
        except Exception as e:  # noqa: BLE001 - the test looks at it
            outcome["error"] = e
        outcome["at"] = time.monotonic()

    thread = threading.Thread(target=wait, daemon=True)
    started = time.monotonic()
    thread.start()
    time.sleep(2.5)  # suspended for longer than the timeout: not counted
    assert thread.is_alive(), outcome
    cluster.patch("jobs.batch", name, {"spec": {"suspend": False}})
    resumed = time.monotonic()
    thread.join(30)
    assert isinstance(outcome.get("error"), Verdict), outcome
    assert classify(outcome["error"])[0] == "JobTimeout"
    assert 0.9 <= outcome["at"] - resumed < 10 and outcome["at"] - started > 3


def test_custom_resources_get_the_crds_defaults_on_create(cluster, tmp_path):
    """As a real API server does: what a PruneJob leaves out comes back with the CRD's defaults
    (so every reader of the object sees one defaulted spec, not its own fallbacks)."""
    cluster.kubectl("apply", "-f", "crds/prunejob.yaml")
    cluster.create({"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob", "metadata": {"name": "bare"},
                    "spec": {"model": {"source": "demo"}, "target": {"ratio": 0.3},
                             "pruning": {"metric": "flap"}}})
    spec = cluster.get("prunejobs", "bare")["spec"]
    assert spec["pruning"] == {"metric": "flap", "biasCompensation": True, "refit": False, "headMode": "per-group",
                               "mlpMultiple": 8}
    assert spec["llm"]["provider"] == "local" and spec["evaluator"]["activeDeadlineSeconds"] == 21600
    assert spec["target"]["ratio"] == 0.3 and spec["suspend"] is False
