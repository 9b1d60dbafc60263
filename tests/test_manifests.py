"""The Jobs selfpruner creates, checked against Kubernetes' own schemas (v1.33, strict)
and against Pod Security "restricted"."""

import json

import kubernetes_validate
import pytest

from selfpruner import spec as spec_mod
from selfpruner.cluster import manifests
from selfpruner.cluster.policy import LLM_KEY_ENV

K8S = "1.33"
IMAGE = "registry.example/selfpruner-pruner:0.1.0"


def prunejob(**spec_overrides):
    doc = {"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob",
           "metadata": {"name": "llama-0-3", "namespace": "ml", "uid": "2f0c7a8e-1111-4222-8333-944455556666"},
           "spec": {"model": {"source": "s3://models/llama"}, "target": {"ratio": 0.3},
                    "storage": {"uri": "s3://selfpruner/runs", "endpointURL": "http://minio:9000",
                                "credentialsSecret": {"name": "s3-creds"}},
                    "llm": {"provider": "openai", "model": "gpt-4", "apiKeySecret": {"name": "llm", "key": "token"}},
                    **spec_overrides}}
    return dict(spec_mod.parse(doc))


def all_jobs(pj):
    return {
        "controller": manifests.controller_job(pj, image=IMAGE, service_account="selfpruner-controller", attempt=1),
        "evaluation": manifests.evaluation_job(pj, generation=3, shards=4, image=IMAGE, batch="0123abcd45"),
        "finalize": manifests.finalize_job(pj, image=IMAGE),
    }


@pytest.mark.parametrize("overrides", [
    {},
    {"evaluator": {"gpusPerPod": 2, "parallelism": 8, "nodeSelector": {"nvidia.com/gpu.product": "H200"},
                   "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                   "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                       "nodeSelectorTerms": [{"matchExpressions": [
                           {"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
                   "priorityClassName": "batch-low", "nodeCache": "/var/cache/selfpruner"},
     "queueName": "gpu-queue", "suspend": True},
    {"evaluator": {"gpusPerPod": 8, "gpusPerReplica": 2, "gpuMemory": "141G", "cacheSize": "300Gi"}},
], ids=["defaults", "all-features", "sharded"])
def test_jobs_are_valid_kubernetes(overrides):
    for name, job in all_jobs(prunejob(**overrides)).items():
        kubernetes_validate.validate(job, K8S, strict=True)


def test_every_pod_is_restricted():
    pj = prunejob(evaluator={"nodeCache": ""})
    for job in all_jobs(pj).values():
        pod = job["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert not any("hostPath" in v for v in pod["volumes"])
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp"}


def test_evaluation_job_is_indexed_with_failure_policy():
    pj = prunejob(evaluator={"gpusPerPod": 2, "parallelism": 8, "backoffLimitPerIndex": 3,
                             "nodeSelector": {"gpu": "h200"}}, queueName="gpu-queue")
    job = manifests.evaluation_job(pj, generation=5, shards=4, image=IMAGE, batch="0123abcd45")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == 4
    assert spec["parallelism"] == 4  # never more pods than shards
    assert spec["backoffLimitPerIndex"] == 3 and "backoffLimit" not in spec
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1]["action"] == "FailIndex" and rules[1]["onExitCodes"]["values"] == [manifests.EXIT_UNEVALUABLE]
    assert spec["ttlSecondsAfterFinished"] > 0
    pod = spec["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"gpu": "h200"}
    assert job["metadata"]["labels"][manifests.KUEUE_LABEL] == "gpu-queue"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["SELFPRUNER_GENERATION"] == "5" and env["SELFPRUNER_BATCH"] == "0123abcd45"
    assert job["metadata"]["ownerReferences"][0]["uid"] == pj["metadata"]["uid"]


def test_suspend_and_queue_reach_the_gpu_jobs_only():
    pj = prunejob(suspend=True, queueName="q")
    jobs = all_jobs(pj)
    assert jobs["evaluation"]["spec"]["suspend"] is True and jobs["finalize"]["spec"]["suspend"] is True
    assert manifests.KUEUE_LABEL not in jobs["controller"]["metadata"]["labels"]
    assert "suspend" not in jobs["controller"]["spec"]


def test_the_spec_reaches_the_controller_as_data():
    pj = prunejob(fitness={"text": "s3://texts/it's \"quoted\" $(rm -rf /).txt", "heldOutText": "s3://texts/h.txt"})
    job = manifests.controller_job(pj, image=IMAGE, service_account="sa")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["selfpruner", "controller"] and "args" not in container
    env = {e["name"]: e for e in container["env"]}
    document = json.loads(env["SELFPRUNER_PRUNEJOB"]["value"])
    # the key arrives under a fixed name whatever llm.apiKeyEnv says; the rest of the spec as written
    assert document["spec"]["llm"]["apiKeyEnv"] == LLM_KEY_ENV
    assert {**document["spec"], "llm": pj["spec"]["llm"]} == pj["spec"]
    assert {k: v for k, v in document["spec"]["llm"].items() if k != "apiKeyEnv"} == \
        {k: v for k, v in pj["spec"]["llm"].items() if k != "apiKeyEnv"}
    assert env[LLM_KEY_ENV]["valueFrom"]["secretKeyRef"] == {"name": "llm", "key": "token"}
    assert "OPENAI_API_KEY" not in env
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]


def test_the_crd_is_a_valid_custom_resource_definition():
    crd = spec_mod.crd()
    kubernetes_validate.validate(crd, K8S, strict=True)
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns.keys() >= {"Phase", "Ratio", "Generation", "Age"}
    assert ".status.bestFitness" in columns.values()  # its name: tests/test_crd_conventions.py
    # structural schema: Kubernetes refuses `additionalProperties` next to `properties`
    def walk(node):
        if isinstance(node, dict):
            assert not ("properties" in node and "additionalProperties" in node), node
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(version["schema"]["openAPIV3Schema"])


def test_child_names_are_unique_per_uid_and_bounded():
    """Two PruneJobs whose names share 40 characters (a seed sweep), or one re-created under the
    same name (a new uid), never share a Job; every name fits a label value (63 characters)."""
    long = "llama-2-70b-beta-0-3-wanda-sp-bias-compensation-seed-"
    a = prunejob()
    b = prunejob()
    a["metadata"] = {**a["metadata"], "name": long + "1", "uid": "aaaaaaaa-0000-4000-8000-000000000001"}
    b["metadata"] = {**b["metadata"], "name": long + "2", "uid": "bbbbbbbb-0000-4000-8000-000000000002"}
    recreated = {**a, "metadata": {**a["metadata"], "uid": "cccccccc-0000-4000-8000-000000000003"}}
    names = {}
    for pj in (a, b, recreated):
        for kind, job in all_jobs(pj).items():
            name = job["metadata"]["name"]
            assert len(name) <= 63 and name[0].isalnum() and name[-1].isalnum(), name
            assert name.startswith(long[:20]), name
            assert name not in names, f"{kind} of {pj['metadata']['uid']} shares {name} with {names[name]}"
            names[name] = pj["metadata"]["uid"]
    assert manifests.owned_by(all_jobs(a)["controller"], a) and not manifests.owned_by(all_jobs(a)["controller"], b)
    # as the API returns a Job (kube.py reads plain JSON: no client model spelling)
    assert manifests.owned_by({"metadata": {"ownerReferences": [{"uid": a["metadata"]["uid"]}]}}, a)
    assert not manifests.owned_by({"metadata": {"owner_references": [{"uid": a["metadata"]["uid"]}]}}, a)


def test_a_document_that_skipped_defaulting_gets_the_crds_defaults():
    """The Jobs' settings come from the CRD's defaults (one source), also for a document that did not
    pass through an API server, never from fallbacks of their own."""
    raw = {"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob",
           "metadata": {"name": "raw", "namespace": "ml", "uid": "2f0c7a8e-1111-4222-8333-944455556667"},
           "spec": {"model": {"source": "s3://models/llama"}, "target": {"ratio": 0.3},
                    "storage": {"uri": "s3://selfpruner/runs"},
                    "llm": {"provider": "openai", "model": "m", "apiKeySecret": {"name": "llm", "key": "token"}}}}
    ev = spec_mod.parse(raw).spec["evaluator"]
    job = manifests.evaluation_job(raw, generation=0, shards=3, image=IMAGE, batch="0123abcd45")
    pod = job["spec"]["template"]["spec"]["containers"][0]
    assert pod["resources"]["requests"]["memory"] == ev["memory"]
    assert pod["resources"]["limits"]["nvidia.com/gpu"] == ev["gpusPerPod"]
    assert job["spec"]["backoffLimitPerIndex"] == ev["backoffLimitPerIndex"]
    assert job["spec"]["activeDeadlineSeconds"] == ev["activeDeadlineSeconds"]
    controller = manifests.controller_job(raw, image=IMAGE, service_account="sa")
    env = {e["name"] for e in controller["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert LLM_KEY_ENV in env and spec_mod.parse(raw).spec["llm"]["apiKeyEnv"] not in env


def test_pods_of_several_gpus_get_their_gpus_shared_memory_and_a_sized_cache():
    """A model split over GPUs: the GPU limit, a memory-backed /dev/shm (the runtime's 64 MB is too
    small for NCCL and CUDA IPC), and a cache volume sized for the model, with the disk requested."""
    pj = prunejob(evaluator={"gpusPerPod": 4, "gpusPerReplica": 2, "cacheSize": "300Gi"})
    for job in (manifests.evaluation_job(pj, generation=0, shards=1, image=IMAGE, batch="0123abcd45"),
                manifests.finalize_job(pj, image=IMAGE)):
        pod = job["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": f"{4 * manifests.SHM_PER_GPU}Gi"}
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        assert volumes["node-cache"]["emptyDir"] == {"sizeLimit": "300Gi"}
        assert c["resources"]["requests"]["ephemeral-storage"] == "300Gi"
    one = manifests.evaluation_job(prunejob(), generation=0, shards=1, image=IMAGE, batch="0123abcd45")
    pod = one["spec"]["template"]["spec"]
    assert "dshm" not in {v["name"] for v in pod["volumes"]}  # one GPU: nothing to share
    assert "ephemeral-storage" not in pod["containers"][0]["resources"]["requests"]


def test_bad_gpu_memory_and_cache_size_are_refused_with_the_field():
    with pytest.raises(spec_mod.SpecErrors) as e:
        prunejob(evaluator={"gpuMemory": "lots", "cacheSize": "big"})
    assert any(p.startswith("spec.evaluator.gpuMemory:") for p in e.value.problems)
    assert any(p.startswith("spec.evaluator.cacheSize:") for p in e.value.problems)
