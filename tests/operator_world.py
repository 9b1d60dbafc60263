"""The world the operator tests run in: the Kubernetes emulator with a fake kubelet
(tests/k8s/), moto's S3 server holding the tiny model, and our real
operator as a kopf process. Only the cluster and S3 are stand-ins."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from k8s import Cluster, Kubelet, find_kubectl
from ports import PortTaken, address_in_use, free_port, start_listening
from s3_server import make_bucket, s3_endpoint  # noqa: F401  (a pytest fixture)
from selfpruner import corpus, evaluate
from selfpruner.storage import open_store

needs_kubectl = pytest.mark.skipif(find_kubectl() is None and not os.environ.get("CI"),
                                   reason="no kubectl: run `make tools/bin/kubectl`")
IMAGE = "selfpruner-pruner:test"


def selfpruner_command(argv: list[str]) -> list[str]:
    """The pruner image's entry point -> this interpreter."""
    return [sys.executable, "-m", "selfpruner.cli", *argv[1:]] if argv and argv[0] == "selfpruner" else argv


HELM = Path(__file__).parents[1] / "tools" / "bin" / "helm"
CHART = Path(__file__).parents[1] / "charts" / "selfpruner"
RELEASE_NAMESPACE = "selfpruner-system"
OPERATOR_ACCOUNT = "sp-selfpruner-operator"  # the chart's name for it, release "sp"
RBAC_KINDS = ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
_chart_rbac: list = []
_chart_operator_env: dict = {}


def install_chart_rbac(cluster: Cluster, namespace: str = "default") -> dict:
    """The chart's ServiceAccounts, Roles and bindings (rbac.scope namespaced, watching `namespace`),
    created in the emulator, which enforces them for the operator and the pods: what the chart does
    not grant fails here as on a cluster. Returns the chart's operator settings that go with them
    (its Deployment's SELFPRUNER_KOPF_SCANNING)."""
    if not _chart_rbac:
        helm = str(HELM) if HELM.exists() else shutil.which("helm")
        if helm is None:
            if os.environ.get("CI"):
                raise RuntimeError("no helm: run `make tools/bin/helm`")
            pytest.skip("no helm: run `make tools/bin/helm`")
        text = subprocess.run([helm, "template", "sp", str(CHART), "--namespace", RELEASE_NAMESPACE,
                               "--set", "rbac.scope=namespaced", "--set", f"watchNamespaces={{{namespace}}}"],
                              capture_output=True, text=True, check=True, timeout=60).stdout
        docs = [d for d in yaml.safe_load_all(text) if d]
        _chart_rbac.extend(d for d in docs if d["kind"] in RBAC_KINDS)
        (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
        env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        _chart_operator_env.update({e["name"]: e["value"] for e in env if e["name"] == "SELFPRUNER_KOPF_SCANNING"})
    cluster.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": RELEASE_NAMESPACE}})
    for obj in _chart_rbac:
        cluster.create(copy.deepcopy(obj), namespace=obj["metadata"].get("namespace"))
    return dict(_chart_operator_env)


class Operator:
    """kopf running our handlers as a separate process, as in the operator's Deployment: with the
    token of the chart's operator ServiceAccount, so RBAC gives it what the chart grants and no more."""

    def __init__(self, cluster: Cluster, logs: Path, interval: float = 0.5):
        self.cluster, self.logs = cluster, logs
        self.env = {**cluster.env_as(RELEASE_NAMESPACE, OPERATOR_ACCOUNT), "SELFPRUNER_IMAGE": IMAGE,
                    "SELFPRUNER_RECONCILE_INTERVAL": str(interval), "PYTHONUNBUFFERED": "1",
                    "SELFPRUNER_POLICY": json.dumps({"allowedSecrets": ["s3-credentials", "absent-secret"]}),
                    "SELFPRUNER_CONTROLLER_START_TIMEOUT": "4"}
        self.proc = None

    def start(self) -> "Operator":
        return start_listening(self._start_once)

    def _start_once(self) -> "Operator":
        self.metrics_port, self.health_port = free_port(), free_port()
        self.env["SELFPRUNER_METRICS_PORT"] = str(self.metrics_port)
        start = self.logs.stat().st_size if self.logs.exists() else 0
        log = open(self.logs, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", "default",
             "--liveness", f"http://127.0.0.1:{self.health_port}/healthz", "-m", "selfpruner_operator.handlers"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = self.logs.read_text(errors="replace")[start:]
                if address_in_use(tail):
                    raise PortTaken(tail[-500:])
                raise RuntimeError(f"the operator exited with {self.proc.returncode}:\n{tail[-3000:]}")
            try:
                # both ports answer: this process is the one serving them, not whoever else holds a port
                urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1)
                self.metrics()
            except OSError:
                time.sleep(0.2)
                continue
            time.sleep(0.5)  # a process that found a port taken exits at once
            if self.proc.poll() is None:
                return self
        self.stop()
        tail = self.logs.read_text(errors="replace")[start:]
        if address_in_use(tail):  # the metrics port, taken: kopf retries its startup handler instead of exiting
            raise PortTaken(tail[-500:])
        raise RuntimeError("the operator did not become live:\n" + tail[-3000:])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()


@pytest.fixture
def world(tmp_path, s3_endpoint, tiny_job):  # noqa: F811
    """A cluster, a kubelet, the operator, S3 with the tiny model in it, and a PruneJob document
    (`world.command_hook`, if set, may rewrite a pod's command: fault injection)."""
    make_bucket(s3_endpoint, "models")
    make_bucket(s3_endpoint, "selfpruner")
    doc = tiny_job("e2e")
    folder = Path(doc["spec"]["model"]["source"])
    models = open_store("s3://models", endpoint_url=s3_endpoint)
    for path in sorted(folder.iterdir()):
        models.put_file(f"tiny/{path.name}", path)
    doc["spec"]["model"]["source"] = "s3://models/tiny"
    doc["spec"]["storage"] = {"uri": "s3://selfpruner/runs", "endpointURL": s3_endpoint,
                              "credentialsSecret": {"name": "s3-credentials"}}
    doc["spec"]["evaluator"] = {"gpusPerPod": 0, "parallelism": 2}
    del doc["spec"]["output"]
    with Cluster(tmp_path / "cluster") as cluster:
        cluster.kubectl("apply", "--validate=false", "-f", str(Path(__file__).parents[1] / "crds" / "prunejob.yaml"))
        # the chart's ServiceAccounts (the controllers' among them: without it no controller pod can be
        # created), Roles and bindings; the operator and every pod act under them
        chart_env = install_chart_rbac(cluster)
        cluster.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"},
                        "stringData": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}})
        override = {"SELFPRUNER_CACHE": str(tmp_path / "pod-cache"), "SELFPRUNER_NODE_CACHE": str(tmp_path / "node"),
                    "HOME": str(tmp_path),
                    # pods share this machine's ports: the controllers' metrics servers stay off here
                    "SELFPRUNER_METRICS_PORT": ""}
        hooks: dict = {}

        def command_map(argv):
            argv = selfpruner_command(argv)
            return hooks["command"](argv) if "command" in hooks else argv

        with Kubelet(cluster, command_map=command_map, logs_dir=tmp_path / "pods",
                     override_env=override, service_account_tokens=True) as kubelet:
            kubelet.hooks = hooks
            operator = Operator(cluster, tmp_path / "operator.log")
            operator.env.update(chart_env)
            operator.start()
            try:
                yield cluster, kubelet, operator, doc, s3_endpoint
            finally:
                operator.stop()
                print(kubelet.dump_logs())
                print((tmp_path / "operator.log").read_text()[-4000:])


def serve_controller_metrics(kubelet: Kubelet) -> int:
    """Give the controller pods (and only them) a free port for their search metrics; returns it.
    In a cluster each pod has its own network and binds 9090; here pods share this machine's, so
    the world turns SELFPRUNER_METRICS_PORT off for every pod and this puts it back for the one
    process per PruneJob that serves it (`selfpruner controller`), as the pod's environment would."""
    port = free_port()

    def command(argv: list[str]) -> list[str]:
        return ["env", f"SELFPRUNER_METRICS_PORT={port}", *argv] if argv[-1:] == ["controller"] else argv

    kubelet.hooks["command"] = command
    return port


def apply(cluster: Cluster, doc: dict, tmp: Path) -> None:
    path = tmp / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    cluster.kubectl("apply", "--validate=false", "-f", str(path))


def wait_phase(cluster: Cluster, name: str, phases: tuple[str, ...], timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        pj = cluster.get("prunejobs", name)
        if pj and (pj.get("status") or {}).get("phase") in phases:
            return pj
        time.sleep(0.25)
    raise AssertionError(f"{name} never reached {phases}: {json.dumps((pj or {}).get('status'), indent=1)}")


# -- what the operator tests share ---------------------------------------------------------
def runs_store(endpoint):
    return open_store("s3://selfpruner/runs", endpoint_url=endpoint)


def output(endpoint, pj, name):
    store = runs_store(endpoint)
    key = f"runs/{pj['metadata']['uid']}/output/{name}"
    data = store.get_bytes(key).decode()
    return json.loads(data) if name.endswith(".json") else [json.loads(line) for line in data.splitlines()]


def wait(predicate, timeout=120, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def renamed(doc, name):
    d = copy.deepcopy(doc)
    d["metadata"]["name"] = name
    return d


HELD_SECOND_SHARD = """
import os, sys, time
if os.environ.get("SELFPRUNER_BATCH", "prep") != "prep" and os.environ.get("JOB_COMPLETION_INDEX") == "1":
    while os.path.exists(os.environ["SELFPRUNER_TEST_HOLD"]):
        time.sleep(0.05)  # the second shard waits, so a controller can die while the batch is half done
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def hold_second_shard(kubelet, tmp_path):
    """Shard 1 of every evaluation batch waits while the returned file exists."""
    hold = tmp_path / "hold"
    hold.touch()
    kubelet.override_env["SELFPRUNER_TEST_HOLD"] = str(hold)
    kubelet.hooks["command"] = lambda argv: ([sys.executable, "-c", HELD_SECOND_SHARD, *argv[1:]]
                                             if argv[-1] == "worker" else argv)
    return hold


def restart_operator(operator, **env):
    operator.stop()
    operator.env.update(env)
    operator.start()


def jobs_of(cluster, name):
    return cluster.list("jobs", labels=f"selfpruner.io/prunejob={name}")


def condition(pj, type_):
    return {c["type"]: c for c in pj["status"]["conditions"]}[type_]
