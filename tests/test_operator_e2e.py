"""`kubectl apply -f prunejob.yaml` end to end: the real operator (kopf), controller,
evaluation and finalize Jobs, against the Kubernetes emulator (tests/cluster_harness.py,
which plays the API server, kubelet and Job controller; see tests/README.md for what it
cannot show) and moto's S3 server. Only the cluster and S3 are stand-ins."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from cluster_harness import Cluster, Kubelet, find_kubectl
from s3_server import make_bucket, s3_endpoint  # noqa: F401  (a pytest fixture)
from selfpruner import corpus, evaluate
from selfpruner.storage import open_store

pytestmark = pytest.mark.skipif(find_kubectl() is None and not os.environ.get("CI"),
                                reason="no kubectl: run `make tools/bin/kubectl`")
IMAGE = "selfpruner-pruner:test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def selfpruner_command(argv: list[str]) -> list[str]:
    """The pruner image's entry point -> this interpreter."""
    return [sys.executable, "-m", "selfpruner.cli", *argv[1:]] if argv and argv[0] == "selfpruner" else argv


class Operator:
    """kopf running our handlers as a separate process, as in the operator's Deployment."""

    def __init__(self, cluster: Cluster, logs: Path, interval: float = 0.5):
        self.cluster, self.logs = cluster, logs
        self.metrics_port, self.health_port = free_port(), free_port()
        self.env = {**cluster.env, "SELFPRUNER_IMAGE": IMAGE, "SELFPRUNER_METRICS_PORT": str(self.metrics_port),
                    "SELFPRUNER_RECONCILE_INTERVAL": str(interval), "PYTHONUNBUFFERED": "1"}
        self.proc = None

    def start(self) -> "Operator":
        log = open(self.logs, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", "default",
             "--liveness", f"http://127.0.0.1:{self.health_port}/healthz", "-m", "selfpruner_operator.handlers"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1)
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the operator did not become live:\n" + self.logs.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()


@pytest.fixture
def world(tmp_path, s3_endpoint, tiny_job):  # noqa: F811
    """A cluster, a kubelet, the operator, S3 with the tiny model in it, and a PruneJob document."""
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
        cluster.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"},
                        "stringData": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}})
        override = {"SELFPRUNER_CACHE": str(tmp_path / "pod-cache"), "SELFPRUNER_NODE_CACHE": str(tmp_path / "node"),
                    "HOME": str(tmp_path)}
        with Kubelet(cluster, command_map=selfpruner_command, logs_dir=tmp_path / "pods",
                     override_env=override) as kubelet:
            operator = Operator(cluster, tmp_path / "operator.log").start()
            try:
                yield cluster, kubelet, operator, doc, s3_endpoint
            finally:
                operator.stop()
                print(kubelet.dump_logs())
                print((tmp_path / "operator.log").read_text()[-4000:])


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


def test_prunejob_end_to_end(world, tmp_path):
    cluster, kubelet, operator, doc, endpoint = world
    apply(cluster, doc, tmp_path)
    pj = wait_phase(cluster, "e2e", ("Succeeded", "Failed", "Invalid"))
    status = pj["status"]
    assert status["phase"] == "Succeeded", status
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True"
    assert all(c["lastTransitionTime"] and "observedGeneration" in c for c in status["conditions"])
    assert status["generation"] == 3 and status["evaluations"] > 0
    assert status["checkpointURI"].startswith("s3://selfpruner/runs/")
    assert status["cost"]["tokensEvaluated"] > 0

    reasons = {e["reason"] for e in cluster.events("e2e")}
    assert {"ControllerStarted", "Succeeded"} <= reasons, reasons

    # the checkpoint in S3 loads with transformers and measures what the search measured
    from transformers import AutoModelForCausalLM, AutoTokenizer

    runs = open_store("s3://selfpruner/runs", endpoint_url=endpoint)
    uid = pj["metadata"]["uid"]
    result = runs.get_json(f"runs/{uid}/output/result.json")
    local = tmp_path / "checkpoint"
    prefix = f"runs/{uid}/checkpoint/"
    for key in runs.list(prefix):
        target = local / key[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        runs.get_file(key, target)
    model = AutoModelForCausalLM.from_pretrained(local, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(local)
    fitness = doc["spec"]["fitness"]
    ids = corpus.tokenize(tokenizer, corpus.load_text(fitness["text"]))
    ppl = evaluate.perplexity(model, ids, seq_len=fitness["seqLen"], max_tokens=fitness["tokens"])
    assert ppl.perplexity == pytest.approx(result["best"]["fitness"], rel=1e-4)
    assert status["bestFitness"] == pytest.approx(result["best"]["fitness"])

    text = operator.metrics()
    assert 'selfpruner_prunejobs{phase="Succeeded"} 1.0' in text
    assert "selfpruner_operator_reconcile_duration_seconds_count" in text


def test_invalid_prunejob_is_refused_and_nothing_is_created(world, tmp_path):
    cluster, kubelet, operator, doc, _ = world
    bad = json.loads(json.dumps(doc))
    bad["metadata"]["name"] = "bad"
    bad["spec"]["target"]["ratio"] = 0.9  # above maxRate 0.6: a CEL rule the emulator does not run
    apply(cluster, bad, tmp_path)
    pj = wait_phase(cluster, "bad", ("Invalid",), timeout=60)
    condition = {c["type"]: c for c in pj["status"]["conditions"]}["Invalid"]
    assert "ratio must lie between minRate and maxRate" in condition["message"]
    assert cluster.list("jobs", labels="selfpruner.io/prunejob=bad") == []
    assert "Invalid" in {e["reason"] for e in cluster.events("bad")}
