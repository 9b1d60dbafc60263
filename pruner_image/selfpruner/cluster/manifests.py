"""The controller Job, the per-generation evaluation Job (Indexed) and the finalize Job.

Every pod runs as a non-root user with a read-only root filesystem, no privilege
escalation, all capabilities dropped and the RuntimeDefault seccomp profile (Pod
Security "restricted", and OpenShift's restricted-v2 SCC: no fixed uid unless the
installation sets one, so the SCC can assign one from the namespace's range); writable
paths are volumes. The PruneJob reaches the controller as JSON in an environment
variable, never spliced into a shell line.

The installation's pod settings (the chart's `pruner` values but its image: pull
Secrets, the GPU resource name, the GPU pods' RuntimeClass, extra pod labels and
annotations, the controller's resources, the uid/gid) reach the operator as JSON in
SELFPRUNER_PODS, and go from it to every controller in the same variable, as the policy
does: the controller builds the GPU Jobs with the same settings.
"""

from __future__ import annotations

import json
import os

from ..spec import defaulted_spec
from .defaults import json_env
from .policy import KUEUE_PRIORITY_LABEL, LLM_KEY_ENV
from .status import API_VERSION, KIND

EXIT_UNEVALUABLE = 42  # a pod's exit code for "bad input: retrying cannot help" (cluster/pod_env.py)
EXIT_DEVICE_ERROR = 43  # a worker's for "the GPU failed" (out of memory, CUDA/NCCL error): retry elsewhere
# the images' USER (Dockerfile): pods run as it unless the installation sets podSecurityContext.runAsUser
RUN_AS_USER = 10001
METRICS_PORT = 9090  # the controller's search metrics (workers report through it)
KUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# the Kueue labels of a PruneJob its GPU Jobs carry (spec.queueName, when set, wins over the label)
KUEUE_LABELS = (KUEUE_LABEL, KUEUE_PRIORITY_LABEL)
PODS_ENV = "SELFPRUNER_PODS"
GPU_RESOURCE = "nvidia.com/gpu"
CONTROLLER_RESOURCES = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}
# the installation may set these of a pod's securityContext; the rest is fixed (restricted)
POD_SECURITY_KEYS = ("runAsUser", "runAsGroup", "fsGroup")
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


def pod_settings(environ=os.environ) -> dict:
    """The installation's pod settings (SELFPRUNER_PODS, the chart's `pruner` values but its image);
    a bad value stops the operator or controller with one line naming the chart value."""
    settings = json_env(environ, PODS_ENV, "pruner")
    for key in ("podLabels", "podAnnotations", "podSecurityContext", "controller"):
        if not isinstance(settings.get(key) or {}, dict):
            raise SystemExit(f"{PODS_ENV}: {key} must be a JSON object; fix the chart's `pruner.{key}` value")
    if not isinstance(settings.get("imagePullSecrets") or [], list):
        raise SystemExit(f"{PODS_ENV}: imagePullSecrets must be a list; fix the chart's "
                         "`pruner.imagePullSecrets` value")
    return settings


def _settings(pods: dict | None) -> dict:
    return pod_settings() if pods is None else pods


def kueue_labels(pj: dict) -> dict:
    """The PruneJob's Kueue labels (queue, workload priority class) for its GPU Jobs; spec.queueName
    wins over a queue-name label."""
    given = pj["metadata"].get("labels") or {}
    out = {k: given[k] for k in KUEUE_LABELS if given.get(k)}
    if pj["spec"].get("queueName"):
        out[KUEUE_LABEL] = pj["spec"]["queueName"]
    return out


def labels(pj: dict, component: str, **extra: str) -> dict:
    out = {"app.kubernetes.io/name": "selfpruner", COMPONENT_LABEL: component,
           "app.kubernetes.io/managed-by": "selfpruner-operator",
           PRUNEJOB_LABEL: label_value(pj["metadata"]["name"]), UID_LABEL: pj["metadata"]["uid"]}
    out.update(extra)
    return out


def pod_security(pods: dict | None = None) -> dict:
    """runAsNonRoot and RuntimeDefault seccomp always; a uid, gid or fsGroup only where the installation
    sets one (none by default: the image's USER 10001 on plain Kubernetes, the namespace's range under
    OpenShift's restricted-v2 SCC, which refuses a fixed uid outside it)."""
    given = (pods or {}).get("podSecurityContext") or {}
    out = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    out.update({k: int(given[k]) for k in POD_SECURITY_KEYS if given.get(k) is not None})
    return out


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


def _pod_installation(pod: dict, pods: dict) -> dict:
    """The installation's settings every pruner pod gets: pull Secrets (and pull policy)."""
    if pods.get("imagePullSecrets"):
        pod["imagePullSecrets"] = [{"name": s["name"]} for s in pods["imagePullSecrets"]]
    if pods.get("imagePullPolicy"):
        for c in pod["containers"]:
            c["imagePullPolicy"] = pods["imagePullPolicy"]
    return pod


def _job(pj: dict, name: str, component: str, pod_spec: dict, *, pods: dict, extra_labels: dict | None = None,
         job_spec: dict | None = None, queue: bool = False) -> dict:
    lab = labels(pj, component, **(extra_labels or {}))
    spec = pj["spec"]
    job_labels = dict(lab)
    if queue:
        job_labels.update(kueue_labels(pj))
    # the installation's pod labels, never over selfpruner's own (selectors and monitors rely on them)
    pod_meta = {"labels": {**(pods.get("podLabels") or {}), **lab}}
    if pods.get("podAnnotations"):
        pod_meta["annotations"] = dict(pods["podAnnotations"])
    body = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": pj["metadata"].get("namespace", "default"), "labels": job_labels,
                     "ownerReferences": [owner_reference(pj)]},
        "spec": {"backoffLimit": 0, "ttlSecondsAfterFinished": 3600,
                 "template": {"metadata": pod_meta, "spec": _pod_installation(pod_spec, pods)}},
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
                   policy: dict | None = None, installation: dict | None = None, pods: dict | None = None) -> dict:
    """The search loop's pod (CPU). `attempt` numbers the Jobs started for one PruneJob:
    a lost controller is replaced by a new Job that resumes from storage. The installation's
    `policy`, `installation` defaults and `pods` settings (default: SELFPRUNER_PODS) go with it:
    the controller checks every Job it creates against the first two and builds it with the
    third. The LLM key arrives under a fixed variable name (LLM_KEY_ENV), whatever
    `llm.apiKeyEnv` says: a PruneJob never chooses a pod's environment variable names."""
    pods = _settings(pods)
    spec = pj["spec"]
    document = {k: pj[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in pj}
    document["metadata"] = {k: pj["metadata"][k] for k in ("name", "namespace", "uid") if k in pj["metadata"]}
    given_labels = pj["metadata"].get("labels") or {}
    if any(given_labels.get(k) for k in KUEUE_LABELS):  # for the GPU Jobs the controller creates
        document["metadata"]["labels"] = {k: given_labels[k] for k in KUEUE_LABELS if given_labels.get(k)}
    llm = defaulted_spec(spec)["llm"]
    document["spec"] = {**document.get("spec", {}), "llm": {**(spec.get("llm") or {}), "apiKeyEnv": LLM_KEY_ENV}}
    env = _common_env(pj) + [{"name": "SELFPRUNER_PRUNEJOB", "value": json.dumps(document, sort_keys=True)},
                             {"name": "SELFPRUNER_IMAGE", "value": image},
                             {"name": "SELFPRUNER_METRICS_PORT", "value": str(METRICS_PORT)},
                             {"name": "SELFPRUNER_POLICY", "value": json.dumps(policy or {}, sort_keys=True)},
                             {"name": "SELFPRUNER_DEFAULTS", "value": json.dumps(installation or {}, sort_keys=True)},
                             {"name": PODS_ENV, "value": json.dumps(pods, sort_keys=True)}]
    storage_env, env_from = _storage_env(pj)
    env += storage_env
    if llm.get("apiKeySecret"):
        env.append({"name": LLM_KEY_ENV,
                    "valueFrom": {"secretKeyRef": {"name": llm["apiKeySecret"]["name"],
                                                   "key": llm["apiKeySecret"]["key"]}}})
    container = {"name": "controller", "image": image, "command": ["selfpruner", "controller"], "env": env,
                 "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
                 "resources": (pods.get("controller") or {}).get("resources") or CONTROLLER_RESOURCES,
                 "securityContext": container_security(), "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}
    if env_from:
        container["envFrom"] = env_from
    pod = {"serviceAccountName": service_account, "restartPolicy": "Never", "securityContext": pod_security(pods),
           "containers": [container], "volumes": [{"name": "tmp", "emptyDir": {}}]}
    name = child_name(pj, f"controller-{attempt}")
    # a controller that cannot identify or reach its PruneJob exits EXIT_UNEVALUABLE: the Job fails at
    # once with reason PodFailurePolicy, which the operator reports instead of restarting it
    failure_policy = {"rules": [{"action": "FailJob", "onExitCodes": {
        "containerName": "controller", "operator": "In", "values": [EXIT_UNEVALUABLE]}}]}
    return _job(pj, name, "controller", pod, pods=pods, extra_labels={"selfpruner.io/attempt": str(attempt)},
                job_spec={"podFailurePolicy": failure_policy})


SHM_PER_GPU = 1  # GiB of memory-backed /dev/shm per GPU of a pod with several


def _evaluator_pod(pj: dict, *, image: str, container_name: str, command: list[str], extra_env: list,
                   pods: dict) -> dict:
    ev = evaluator(pj)
    storage_env, env_from = _storage_env(pj)
    resources = {"requests": {"cpu": str(ev["cpu"]), "memory": str(ev["memory"])},
                 "limits": {"memory": str(ev["memory"])}}
    gpus = ev["gpusPerPod"]
    gpu_resource = pods.get("gpuResource") or GPU_RESOURCE  # nvidia.com/gpu, a MIG profile, amd.com/gpu, ...
    if gpus:
        resources["limits"][gpu_resource] = gpus
        resources["requests"][gpu_resource] = gpus
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
    pod = {"restartPolicy": "Never", "securityContext": pod_security(pods), "containers": [container],
           "volumes": volumes, "automountServiceAccountToken": False}
    if gpus and pods.get("runtimeClassName"):  # a CPU-only pod (gpusPerPod 0) stays on the node's default runtime
        pod["runtimeClassName"] = pods["runtimeClassName"]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        if ev.get(key):
            pod[key] = ev[key]
    return pod


def evaluation_job(pj: dict, *, generation: int, shards: int, image: str, batch: str,
                   pods: dict | None = None) -> dict:
    """One Indexed Job per batch of candidates (a generation's screening round, its full
    round, ...); index i evaluates shard i of the batch, read from and written back to
    storage. `batch` is a hash of the batch's tasks: the same request gets the same Job.
    `pods`: the installation's pod settings (default: SELFPRUNER_PODS)."""
    ev = evaluator(pj)
    pods = _settings(pods)
    pod = _evaluator_pod(pj, image=image, container_name="worker", command=["selfpruner", "worker"],
                         extra_env=[{"name": "SELFPRUNER_GENERATION", "value": str(generation)},
                                    {"name": "SELFPRUNER_BATCH", "value": batch}], pods=pods)
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
    job = _job(pj, name, "evaluator", pod, pods=pods, extra_labels={"selfpruner.io/generation": str(generation)},
               job_spec=job_spec, queue=True)
    job["spec"].pop("backoffLimit", None)
    return job


def finalize_job(pj: dict, *, image: str, pods: dict | None = None) -> dict:
    """Exports the best candidate as a pruned checkpoint into storage (GPU)."""
    pods = _settings(pods)
    pod = _evaluator_pod(pj, image=image, container_name="finalize", command=["selfpruner", "finalize"], extra_env=[],
                         pods=pods)
    disrupted = {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    job = _job(pj, child_name(pj, "finalize"), "finalize", pod, pods=pods, queue=True,
               job_spec={"backoffLimit": 2, "activeDeadlineSeconds": active_deadline(pj),
                         "podFailurePolicy": {"rules": [disrupted]}})
    return job
