"""The one way selfpruner talks to Kubernetes, for the operator and the controller alike.

Objects travel as plain dicts in the API's own shape (`_preload_content=False`): the same dicts
`manifests` builds, with no client model classes and no snake_case in between. Every call is
retried on what a real cluster does now and then (429 with its Retry-After, 5xx, a reset
connection), with exponential backoff and jitter, before anything fails: one blip of the API
server must not cost a controller, let alone a PruneJob. Errors that remain are classified by
their HTTP status, never by a class name (the client raises subclasses of ApiException).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable

from .manifests import owner_uids
from .status import GROUP, PLURAL, VERSION, merge_conditions, now

TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}
RETRIES = int(os.environ.get("SELFPRUNER_API_RETRIES", "6"))
BACKOFF = float(os.environ.get("SELFPRUNER_API_BACKOFF", "0.5"))  # seconds, doubled per try
MAX_BACKOFF = 30.0
# secrets a pod may hold in its environment: never written into a status or an event
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "SELFPRUNER_LLM_API_KEY")

_config_lock = threading.Lock()


class ChildConflict(Exception):
    """A child's name is taken by an object of another owner: deterministic, never retried."""


def http_status(e: BaseException) -> int | None:
    """The HTTP status of an API error (ApiException and its subclasses), else None."""
    from kubernetes.client.exceptions import ApiException

    return e.status if isinstance(e, ApiException) and isinstance(e.status, int) else None


def is_transient(e: BaseException) -> bool:
    """Whether waiting and asking again can help: throttling, a server error, a lost connection."""
    status = http_status(e)
    if status is not None:
        return status in TRANSIENT_HTTP or status == 0
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    return type(e).__module__.split(".")[0] in ("urllib3", "http")


def _retry_after(e: BaseException) -> float | None:
    headers = getattr(e, "headers", None) or {}
    try:
        return float(headers.get("Retry-After"))
    except (TypeError, ValueError):
        return None


def call(fn: Callable, *args, retries: int | None = None, sleep=time.sleep, **kwargs):
    """`fn(*args, **kwargs)`, retried on transient errors; the last error is raised."""
    tries = RETRIES if retries is None else retries
    for attempt in range(tries + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - classified right here
            if attempt == tries or not is_transient(e):
                raise
            delay = _retry_after(e) or min(MAX_BACKOFF, BACKOFF * 2 ** attempt)
            sleep(delay * random.uniform(0.5, 1.0))


def redact(text: str, environ=os.environ) -> str:
    """`text` with every secret value this process holds replaced by `***`."""
    for name in SECRET_ENV:
        value = environ.get(name) or ""
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


_clients: dict[str | None, object] = {}


def _api_client(config_file: str | None):
    """One client (and connection pool) per configuration and process: the operator makes a Kube
    per handler call, and a pool per call would leak sockets until garbage collection. The
    credentials: an explicit kubeconfig (tests, a workstation), else the pod's ServiceAccount, else
    KUBECONFIG; none of them raises ConfigException."""
    from kubernetes import client, config

    with _config_lock:
        if config_file not in _clients:
            configuration = client.Configuration()
            if config_file:
                config.load_kube_config(config_file=config_file, client_configuration=configuration)
            else:
                try:
                    config.load_incluster_config(client_configuration=configuration)
                except config.ConfigException:
                    config.load_kube_config(client_configuration=configuration)
            _clients[config_file] = client.ApiClient(configuration)
        return _clients[config_file]


class Kube:
    """The API calls of one namespace."""

    def __init__(self, namespace: str, config_file: str | None = None):
        from kubernetes import client

        self.namespace = namespace
        self.api = _api_client(config_file)
        self.batch = client.BatchV1Api(self.api)
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    @staticmethod
    def _json(resp) -> dict:
        return json.loads(resp.data)

    def _read(self, fn, *args) -> dict | None:
        try:
            return self._json(call(fn, *args, _preload_content=False))
        except Exception as e:  # noqa: BLE001
            if http_status(e) == 404:
                return None
            raise

    # -- Jobs -------------------------------------------------------------------------------------
    def create_job(self, body: dict, attempts: int = 3) -> dict:
        """Create, or return the Job of that name if it exists already and is ours (idempotent);
        a Job of that name owned by another owner is ChildConflict, never adopted. A Job that
        exists on create and is gone on read was deleted in between: created again, `attempts`
        times at most, so a Job something keeps deleting cannot hold the search in a loop."""
        name = body["metadata"]["name"]
        for _ in range(attempts):
            try:
                return self._json(call(self.batch.create_namespaced_job, self.namespace, body, _preload_content=False))
            except Exception as e:  # noqa: BLE001
                if http_status(e) != 409:
                    raise
            existing = self.read_job(name)
            if existing is None:
                continue
            theirs = owner_uids(existing)
            if not (owner_uids(body) & theirs):
                raise ChildConflict(f"Job {name} already exists and belongs to another owner "
                                    f"({', '.join(sorted(theirs)) or 'none'})")
            return existing
        raise RuntimeError(f"Job {name}: creating it answered 'already exists' and reading it 'not found', "
                           f"{attempts} times in a row; something else keeps creating and deleting that Job")

    def read_job(self, name: str) -> dict | None:
        return self._read(self.batch.read_namespaced_job, name, self.namespace)

    def list_jobs(self, selector: str) -> list[dict]:
        return self._json(call(self.batch.list_namespaced_job, self.namespace, label_selector=selector,
                               _preload_content=False)).get("items") or []

    def delete_job(self, name: str) -> bool:
        """Delete a Job and (in the background) its pods; False if it was gone already."""
        try:
            call(self.batch.delete_namespaced_job, name, self.namespace, propagation_policy="Background")
            return True
        except Exception as e:  # noqa: BLE001
            if http_status(e) == 404:
                return False
            raise

    def patch_job(self, name: str, patch: dict) -> None:
        call(self.batch.patch_namespaced_job, name, self.namespace, patch)

    def list_pods(self, selector: str) -> list[dict]:
        return self._json(call(self.core.list_namespaced_pod, self.namespace, label_selector=selector,
                               _preload_content=False)).get("items") or []

    def job_events(self, name: str) -> list[dict]:
        """Events about a Job (FailedCreate: pods it cannot create)."""
        return self._json(call(self.core.list_namespaced_event, self.namespace,
                               field_selector=f"involvedObject.kind=Job,involvedObject.name={name}",
                               _preload_content=False)).get("items") or []

    # -- the PruneJob -----------------------------------------------------------------------------
    def read_prunejob(self, name: str) -> dict | None:
        return self._read(self.custom.get_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, name)

    def patch_status(self, name: str, status: dict) -> None:
        """Merge `status` into the PruneJob's; conditions merge by type with those there (a merge
        patch would replace the whole list, dropping the operator's). Messages are redacted."""
        status = json.loads(redact(json.dumps(status)))
        if "conditions" in status:
            live = self.read_prunejob(name) or {}
            status = {**status, "conditions": merge_conditions((live.get("status") or {}).get("conditions"),
                                                               status["conditions"])}
        call(self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, self.namespace, PLURAL, name,
             {"status": status})

    def event(self, prunejob: dict, reason: str, message: str, type_: str = "Normal") -> None:
        meta = prunejob["metadata"]
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": self.namespace},
            "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PruneJob", "name": meta["name"],
                               "namespace": self.namespace, "uid": meta.get("uid")},
            "reason": reason, "message": redact(message)[:1000], "type": type_,
            "source": {"component": "selfpruner-controller"},
            "firstTimestamp": now(), "lastTimestamp": now(), "count": 1,
        }
        call(self.core.create_namespaced_event, self.namespace, body)


# -- reading a Job's state: the one place -----------------------------------------------------------
def job_finished(job: dict | None) -> str | None:
    """'Complete', 'Failed' or None (still running, suspended, or no Job)."""
    for c in ((job or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True":
            return c["type"]
    return None


def job_failure(job: dict | None) -> str:
    """'reason: message' of a failed Job, from its Failed condition; '' if none."""
    for c in ((job or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == "Failed" and c.get("status") == "True":
            return f"{c.get('reason') or 'no reason'}: {c.get('message') or ''}".rstrip(": ")
    return ""


def job_has_pods(job: dict | None) -> bool:
    """Whether the Job still has pods running or terminating (never two controllers at once)."""
    status = (job or {}).get("status") or {}
    return bool(status.get("active") or status.get("terminating"))


# pod waiting reasons no wait will cure by itself (a missing image, Secret or ServiceAccount)
STUCK = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
         "CreateContainerError", "ErrImageNeverPull"}


def pod_stuck(pod: dict) -> tuple[str, str] | None:
    """(reason, message) when a pod cannot start: a container waiting for a reason no wait cures,
    or a pod the scheduler cannot place."""
    name = (pod.get("metadata") or {}).get("name", "?")
    status = pod.get("status") or {}
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK:
            return waiting["reason"], f"pod {name}: {waiting['reason']}: {waiting.get('message') or ''}".strip(": ")
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            return "Unschedulable", f"pod {name}: {c.get('message') or 'cannot be scheduled'}"
    return None


def job_stuck(kube: Kube, job: dict) -> tuple[str, str] | None:
    """(reason, message) when a Job's pods cannot start or cannot even be created (FailedCreate:
    a missing ServiceAccount, a quota, a LimitRange, an admission refusal)."""
    name = job["metadata"]["name"]
    for pod in kube.list_pods(f"job-name={name}"):
        stuck = pod_stuck(pod)
        if stuck:
            return stuck
    if job_has_pods(job):
        return None
    for event in reversed(kube.job_events(name)):
        if event.get("reason") == "FailedCreate":
            return "FailedCreate", f"Job {name} cannot create its pods: {event.get('message') or ''}".strip(": ")
    return None


INDEX_KEY = "batch.kubernetes.io/job-completion-index"


def failed_pod_exits(kube: Kube, job_name: str) -> dict[int, list[tuple[int, str]]]:
    """Per completion index of an Indexed Job, (exit code, reason) of each of its pods that failed
    and counted against its retries: a pod preempted or evicted (DisruptionTarget=True) is left out,
    as the Job's podFailurePolicy ignores it, so it never explains why an index failed."""
    exits: dict[int, list[tuple[int, str]]] = {}
    for pod in kube.list_pods(f"job-name={job_name}"):
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        if any(c.get("type") == "DisruptionTarget" and c.get("status") == "True"
               for c in status.get("conditions") or []):
            continue
        index = next((m[INDEX_KEY] for m in (meta.get("labels"), meta.get("annotations")) if m and INDEX_KEY in m),
                     None)  # a label since Kubernetes 1.28, an annotation before
        for cs in status.get("containerStatuses") or []:
            terminated = (cs.get("state") or {}).get("terminated") or {}
            if index is not None and terminated.get("exitCode"):  # 0: it succeeded
                exits.setdefault(int(index), []).append((terminated["exitCode"], terminated.get("reason") or ""))
    return exits


def indexes(text: str | None) -> set[int]:
    """Parse Kubernetes' index sets: "1,3-5" -> {1, 3, 4, 5}."""
    out: set[int] = set()
    for part in (text or "").split(","):
        if not part.strip():
            continue
        if "-" in part:
            a, b = part.split("-")
            out.update(range(int(a), int(b) + 1))
        else:
            out.add(int(part))
    return out
