"""The controller Job, the per-generation evaluation Job (Indexed) and the finalize Job.

Every pod runs as a non-root user with a read-only root filesystem, no privilege
escalation, all capabilities dropped and the RuntimeDefault seccomp profile (Pod
Security "restricted"); writable paths are volumes. The PruneJob reaches the controller
as JSON in an environment variable, never spliced into a shell line.
"""

from __future__ import annotations

import json

from ..spec import defaulted_spec
from .policy import LLM_KEY_ENV
from .status import API_VERSION, KIND

EXIT_UNEVALUABLE = 42  # a pod's exit code for "bad input: retrying cannot help" (cluster/pod_env.py)
EXIT_DEVICE_ERROR = 43  # a worker's for "the GPU failed" (out of memory, CUDA/NCCL error): retry elsewhere
RUN_AS_USER = 10001
METRICS_PORT = 9090  # the controller's search metrics (workers report through it)
KUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRUNEJOB_LABEL = "selfpruner.io/prunejob"  # the PruneJob's name, cut to a label value (for people)
UID_LABEL = "selfpruner.io/uid"  # the PruneJob's uid (for selecting its children exactly)
COMPONENT_LABEL = "app.kubernetes.io/component"


def owner_reference(pj: dict) -> dict:
    meta = pj["metadata"]
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


MAX_NAME = 63  # a Job's name becomes its pods' `job-name` label value: 63 characters at most
# an Indexed Job's pods are named and host-named `<job>-<index>`, which must be a DNS label (63):
# room for the largest index the CRD allows (evaluator.parallelism <= 10000 shards: "-9999")
MAX_INDEXED_NAME = MAX_NAME - len("-9999")


def child_name(pj: dict, suffix: str, limit: int = MAX_NAME) -> str:
    """`<PruneJob name, cut>-<first 8 of its uid>-<suffix>`: unique per PruneJob uid, so two
    PruneJobs whose names share a prefix (a seed sweep), or one re-created under the same
    name before garbage collection, never share a Job; bounded to `limit` characters."""
    meta = pj["metadata"]
    uid = "".join(c for c in meta["uid"].lower() if c.isalnum())[:8]
    room = limit - len(uid) - len(suffix) - 2
    return f"{meta['name'][:room].rstrip('-.')}-{uid}-{suffix}"


def owner_uids(obj: dict) -> set[str]:
    """The owners' uids of an object as the API returns it (kube.py reads plain JSON)."""
    meta = obj.get("metadata") or {}
    return {r.get("uid") for r in meta.get("ownerReferences") or []}


def owned_by(job: dict, pj: dict) -> bool:
    """Whether `job` (as read from the API) is one of this PruneJob's children."""
    return pj["metadata"]["uid"] in owner_uids(job)


def label_value(text: str) -> str:
    """A label value: 63 characters at most, alphanumeric at both ends."""
    return text[:63].rstrip("-_.")


def children_selector(meta: dict) -> str:
    """The label selector of a PruneJob's Jobs (from its metadata): by uid, exact."""
    return f"{UID_LABEL}={meta['uid']}"


def labels(pj: dict, component: str, **extra: str) -> dict:
    out = {"app.kubernetes.io/name": "selfpruner", COMPONENT_LABEL: component,
           "app.kubernetes.io/managed-by": "selfpruner-operator",
           PRUNEJOB_LABEL: label_value(pj["metadata"]["name"]), UID_LABEL: pj["metadata"]["uid"]}
    out.update(extra)
    return out


def pod_security() -> dict:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security() -> dict:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def _storage_env(pj: dict) -> tuple[list, list]:
    storage = pj["spec"].get("storage") or {}
    env = [{"name": "SELFPRUNER_STORE", "value": storage.get("uri", "")}]
    if storage.get("endpointURL"):
        env.append({"name": "AWS_ENDPOINT_URL", "value": storage["endpointURL"]})
    if storage.get("region"):
        env.append({"name": "AWS_DEFAULT_REGION", "value": storage["region"]})
    env_from = []
    if storage.get("credentialsSecret"):
        env_from.append({"secretRef": {"name": storage["credentialsSecret"]["name"]}})
    return env, env_from


def _common_env(pj: dict) -> list:
    meta = pj["metadata"]
    return [{"name": "SELFPRUNER_PRUNEJOB_NAME", "value": meta["name"]},
            {"name": "SELFPRUNER_PRUNEJOB_UID", "value": meta["uid"]},
            {"name": "SELFPRUNER_NAMESPACE", "value": meta.get("namespace", "default")},
            {"name": "HOME", "value": "/tmp"}, {"name": "SELFPRUNER_CACHE", "value": "/tmp/selfpruner-cache"}]


def _job(pj: dict, name: str, component: str, pod_spec: dict, *, extra_labels: dict | None = None,
         job_spec: dict | None = None, queue: bool = False) -> dict:
    lab = labels(pj, component, **(extra_labels or {}))
    spec = pj["spec"]
    job_labels = dict(lab)
    if queue and spec.get("queueName"):
        job_labels[KUEUE_LABEL] = spec["queueName"]
    body = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": pj["metadata"].get("namespace", "default"), "labels": job_labels,
                     "ownerReferences": [owner_reference(pj)]},
        "spec": {"backoffLimit": 0, "ttlSecondsAfterFinished": 3600,
                 "template": {"metadata": {"labels": lab}, "spec": pod_spec}},
    }
    body["spec"].update(job_spec or {})
    if queue and spec.get("suspend"):
        body["spec"]["suspend"] = True
    return body


def evaluator(pj: dict) -> dict:
    """spec.evaluator with the CRD's defaults (the API server's defaulting, applied again for a
    document that did not pass through it)."""
    return defaulted_spec(pj["spec"])["evaluator"]


def active_deadline(pj: dict) -> int:
    """Seconds one evaluation or finalize Job may run (Kubernetes does not count suspended time)."""
    return int(evaluator(pj)["activeDeadlineSeconds"])


def controller_job(pj: dict, *, image: str, service_account: str, attempt: int = 0,
                   policy: dict | None = None, installation: dict | None = None) -> dict:
    """The search loop's pod (CPU). `attempt` numbers the Jobs started for one PruneJob:
    a lost controller is replaced by a new Job that resumes from storage. The installation's
    `policy` and `installation` defaults go with it: the controller checks every Job it creates
    against them. The LLM key arrives under a fixed variable name (LLM_KEY_ENV), whatever
    `llm.apiKeyEnv` says: a PruneJob never chooses a pod's environment variable names."""
    spec = pj["spec"]
    document = {k: pj[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in pj}
    document["metadata"] = {k: pj["metadata"][k] for k in ("name", "namespace", "uid") if k in pj["metadata"]}
    llm = defaulted_spec(spec)["llm"]
    document["spec"] = {**document.get("spec", {}), "llm": {**(spec.get("llm") or {}), "apiKeyEnv": LLM_KEY_ENV}}
    env = _common_env(pj) + [{"name": "SELFPRUNER_PRUNEJOB", "value": json.dumps(document, sort_keys=True)},
                             {"name": "SELFPRUNER_IMAGE", "value": image},
                             {"name": "SELFPRUNER_METRICS_PORT", "value": str(METRICS_PORT)},
                             {"name": "SELFPRUNER_POLICY", "value": json.dumps(policy or {}, sort_keys=True)},
                             {"name": "SELFPRUNER_DEFAULTS", "value": json.dumps(installation or {}, sort_keys=True)}]
    storage_env, env_from = _storage_env(pj)
    env += storage_env
    if llm.get("apiKeySecret"):
        env.append({"name": LLM_KEY_ENV,
                    "valueFrom": {"secretKeyRef": {"name": llm["apiKeySecret"]["name"],
                                                   "key": llm["apiKeySecret"]["key"]}}})
    container = {"name": "controller", "image": image, "command": ["selfpruner", "controller"], "env": env,
                 "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
                 "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
                 "securityContext": container_security(), "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}
    if env_from:
        container["envFrom"] = env_from
    pod = {"serviceAccountName": service_account, "restartPolicy": "Never", "securityContext": pod_security(),
           "containers": [container], "volumes": [{"name": "tmp", "emptyDir": {}}]}
    name = child_name(pj, f"controller-{attempt}")
    # a controller that cannot identify or reach its PruneJob exits EXIT_UNEVALUABLE: the Job fails at
    # once with reason PodFailurePolicy, which the operator reports instead of restarting it
    failure_policy = {"rules": [{"action": "FailJob", "onExitCodes": {
        "containerName": "controller", "operator": "In", "values": [EXIT_UNEVALUABLE]}}]}
    return _job(pj, name, "controller", pod, extra_labels={"selfpruner.io/attempt": str(attempt)},
                job_spec={"podFailurePolicy": failure_policy})


SHM_PER_GPU = 1  # GiB of memory-backed /dev/shm per GPU of a pod with several


def _evaluator_pod(pj: dict, *, image: str, container_name: str, command: list[str], extra_env: list) -> dict:
    ev = evaluator(pj)
    storage_env, env_from = _storage_env(pj)
    resources = {"requests": {"cpu": str(ev["cpu"]), "memory": str(ev["memory"])},
                 "limits": {"memory": str(ev["memory"])}}
    gpus = ev["gpusPerPod"]
    if gpus:
        resources["limits"]["nvidia.com/gpu"] = gpus
        resources["requests"]["nvidia.com/gpu"] = gpus
    cache = ev.get("nodeCache") or ""
    volumes = [{"name": "tmp", "emptyDir": {}}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "node-cache", "mountPath": "/var/cache/selfpruner"}]
    if cache:
        volumes.append({"name": "node-cache", "hostPath": {"path": cache, "type": "DirectoryOrCreate"}})
    else:  # the pod's own copy of the weights: sized for the model, so the kubelet places it on a node with room
        size = ev.get("cacheSize")
        volumes.append({"name": "node-cache", "emptyDir": {"sizeLimit": str(size)} if size else {}})
        if size:
            resources["requests"]["ephemeral-storage"] = str(size)
    if gpus > 1:
        # a model split over GPUs, or replicas: NCCL and CUDA IPC want more than the runtime's 64 MB
        # /dev/shm; memory-backed, it counts against the pod's memory limit
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{SHM_PER_GPU * gpus}Gi"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    container = {"name": container_name, "image": ev.get("image") or image, "command": command,
                 "env": _common_env(pj) + storage_env + extra_env + [
                     {"name": "SELFPRUNER_NODE_CACHE", "value": "/var/cache/selfpruner"}],
                 "resources": resources, "securityContext": container_security(), "volumeMounts": mounts}
    if env_from:
        container["envFrom"] = env_from
    pod = {"restartPolicy": "Never", "securityContext": pod_security(), "containers": [container],
           "volumes": volumes, "automountServiceAccountToken": False}
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        if ev.get(key):
            pod[key] = ev[key]
    return pod


def evaluation_job(pj: dict, *, generation: int, shards: int, image: str, batch: str) -> dict:
    """One Indexed Job per batch of candidates (a generation's screening round, its full
    round, ...); index i evaluates shard i of the batch, read from and written back to
    storage. `batch` is a hash of the batch's tasks: the same request gets the same Job."""
    ev = evaluator(pj)
    pod = _evaluator_pod(pj, image=image, container_name="worker", command=["selfpruner", "worker"],
                         extra_env=[{"name": "SELFPRUNER_GENERATION", "value": str(generation)},
                                    {"name": "SELFPRUNER_BATCH", "value": batch}])
    job_spec = {
        "completionMode": "Indexed", "completions": shards, "parallelism": min(ev["parallelism"], shards),
        "activeDeadlineSeconds": ev["activeDeadlineSeconds"],
        "backoffLimitPerIndex": ev["backoffLimitPerIndex"], "backoffLimit": None,
        "podFailurePolicy": {"rules": [
            # a preempted or evicted pod is not the candidate's fault: retry without spending the budget
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "FailIndex", "onExitCodes": {"containerName": "worker", "operator": "In",
                                                    "values": [EXIT_UNEVALUABLE]}},
            # the device failed, not the candidate: a new pod (the scheduler may place it elsewhere)
            # tries again, within backoffLimitPerIndex so a broken node cannot loop until the deadline
            {"action": "Count", "onExitCodes": {"containerName": "worker", "operator": "In",
                                                "values": [EXIT_DEVICE_ERROR]}},
        ]},
    }
    del job_spec["backoffLimit"]  # with backoffLimitPerIndex the Job-wide limit stays unset
    name = child_name(pj, f"b{batch}", limit=MAX_INDEXED_NAME)
    job = _job(pj, name, "evaluator", pod, extra_labels={"selfpruner.io/generation": str(generation)},
               job_spec=job_spec, queue=True)
    job["spec"].pop("backoffLimit", None)
    return job


def finalize_job(pj: dict, *, image: str) -> dict:
    """Exports the best candidate as a pruned checkpoint into storage (GPU)."""
    pod = _evaluator_pod(pj, image=image, container_name="finalize", command=["selfpruner", "finalize"], extra_env=[])
    job = _job(pj, child_name(pj, "finalize"), "finalize", pod,
               job_spec={"backoffLimit": 2, "activeDeadlineSeconds": active_deadline(pj), "podFailurePolicy": {"rules": [
                   {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]}}, queue=True)
    return job
