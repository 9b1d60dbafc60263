"""The cluster quick start as README.md and docs/cluster.md give it, run as a platform engineer runs
it: the chart rendered from examples/cluster/values.yaml (the operator gets that Deployment's
environment: the policy and defaults exactly as the chart writes them), examples/cluster/secrets.yaml
and examples/cluster/prunejob.yaml applied with kubectl, and the PruneJob must end Succeeded.

What is changed, and only that (asserted below, so the list cannot grow unnoticed): the addresses
this machine has instead of the cluster's (S3 is moto, the LLM endpoint a scripted chat server, the
namespace `default`), and what only a GPU cluster has (the 8B model and its texts become the tiny
model and its texts uploaded to S3 the same way; a budget of minutes instead of hours; no GPUs).
The cluster is the emulator of tests/k8s/ (the API server is as strict as Kubernetes about what it
stores; there is no scheduler, so the example's node selector and tolerations are checked by the
policy only)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml
from chat_server import ScriptedChat
from operator_world import apply, needs_kubectl, wait_phase, world  # noqa: F401  (a pytest fixture)
from s3_server import make_bucket, s3_endpoint  # noqa: F401  (a pytest fixture)
from selfpruner.storage import open_store

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "cluster"
HELM = ROOT / "tools" / "bin" / "helm"

# The chart's operator environment that stays this test world's: its ports (pods share this machine's
# network), and its timings (seconds, not the minutes a real cluster needs).
WORLD_ENV = {"SELFPRUNER_METRICS_PORT", "HOME", "SELFPRUNER_RECONCILE_INTERVAL", "SELFPRUNER_CONTROLLER_START_TIMEOUT"}

# What only a real cluster has, replaced (paths in the PruneJob's spec). The texts keep their s3:// URIs:
# the tiny model's texts are uploaded there.
CHANGED = {"model.source", "model.dtype", "calibration.windows", "calibration.seqLen", "fitness.seqLen", "fitness.tokens", "fitness.screenTokens",
           "fitness.heldOutTokens", "fitness.batchSize", "pruning.mlpMultiple", "search.population",
           "search.generations", "search.crossovers", "search.mutations", "llm.model", "evaluator.gpusPerPod",
           "evaluator.parallelism", "evaluator.memory"}


def operator_env(endpoint: str, llm_url: str) -> dict:
    """The operator container's environment as the chart renders it from the example's values, with
    this machine's addresses in place of the cluster's (as a user puts theirs in the values)."""
    out = subprocess.run(
        [str(HELM), "template", "selfpruner", str(ROOT / "charts" / "selfpruner"), "-f", str(EXAMPLES / "values.yaml"),
         "--set", "watchNamespaces={default}", "--set", f"defaults.storage.endpointURL={endpoint}",
         "--set", f"defaults.llm.baseURL={llm_url}"],
        capture_output=True, text=True, check=True).stdout
    (deploy,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def flatten(spec: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in spec.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@needs_kubectl
def test_the_cluster_quick_start_ends_succeeded(world, tmp_path):
    cluster, kubelet, operator, tiny, endpoint = world
    example = yaml.safe_load((EXAMPLES / "prunejob.yaml").read_text())

    # the 8B model and its texts -> the tiny model and its texts, uploaded to S3 as docs/cluster.md says
    make_bucket(endpoint, "texts")
    texts = open_store("s3://texts", endpoint_url=endpoint)
    for name, path in (("calibration", tiny["spec"]["calibration"]["text"]), ("fitness", tiny["spec"]["fitness"]["text"]),
                       ("heldout", tiny["spec"]["fitness"]["heldOutText"])):
        texts.put_file(f"{name}.txt", Path(path))
    doc = json.loads(json.dumps(example))
    spec = doc["spec"]
    spec["model"].update(source=tiny["spec"]["model"]["source"], dtype="float32")
    spec["calibration"].update(windows=4, seqLen=128)
    spec["fitness"].update(seqLen=128, tokens=512, screenTokens=256, heldOutTokens=1024, batchSize=2)
    spec["pruning"]["mlpMultiple"] = 8
    spec["search"].update(population=4, generations=1, crossovers=2, mutations=2)
    spec["llm"]["model"] = "scripted"
    spec["evaluator"].update(gpusPerPod=0, parallelism=2, memory="2Gi")
    before, after = flatten(example["spec"]), flatten(spec)
    assert {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)} == CHANGED
    assert "storage" not in spec and set(spec["llm"]) == {"provider", "model"}  # both from the installation

    with ScriptedChat(dim=6) as chat:
        env = operator_env(endpoint, chat.url)
        operator.stop()
        operator.env.update({k: v for k, v in env.items() if k not in WORLD_ENV})
        operator.start()
        cluster.kubectl("apply", "-f", str(EXAMPLES / "secrets.yaml"))
        apply(cluster, doc, tmp_path)
        pj = wait_phase(cluster, doc["metadata"]["name"], ("Succeeded", "Failed", "Invalid"), timeout=300)
        assert pj["status"]["phase"] == "Succeeded", pj["status"]
        assert chat.requests, "the search never asked the installation's LLM"
        # the installation's key went to the installation's endpoint, and only there
        assert set(chat.authorizations) == {"Bearer replace-me"}

    # what `kubectl get` shows a platform engineer (docs/cluster.md's walkthrough prints the same)
    table = cluster.kubectl("get", "prunejobs").stdout
    print(table, cluster.kubectl("get", "prunejobs", "-o", "wide").stdout)
    header, row = (line.split() for line in table.splitlines())
    assert header == ["NAME", "PHASE", "REASON", "BEST", "METRIC", "RESTARTS", "SUSPENDED", "AGE"], table
    assert row[:3] == [doc["metadata"]["name"], "Succeeded", "SearchFinished"] and row[4] == "perplexity", table
    uid = pj["metadata"]["uid"]
    # storage.uri s3://selfpruner (the example's values) -> one run under runs/<uid>/, not runs/runs/
    assert pj["status"]["checkpointURI"] == f"s3://selfpruner/runs/{uid}/checkpoint"
    store = open_store("s3://selfpruner", endpoint_url=endpoint)
    result = store.get_json(f"runs/{uid}/output/result.json")
    assert result["best"]["rates"], result
    reasons = {e["reason"] for e in cluster.events(doc["metadata"]["name"])}
    assert "DefaultsApplied" in reasons, reasons
