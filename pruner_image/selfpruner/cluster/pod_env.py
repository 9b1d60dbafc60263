"""What a cluster pod reads from its environment, and what its exit code tells Kubernetes.

The operator and the controller write each pod's environment (`manifests`); a pod that finds it
wrong was started wrongly, and no retry changes that. Every variable is read here, once, before
any other work, and a bad one is a `PodEnvError` naming the variable to fix.

Exit codes of `selfpruner controller`, `worker` and `finalize` (stderr says why, in one line):

    0   done; for the controller also a final failure it has reported into the PruneJob's status
    1   transient: the store or the API server unreachable or overloaded; a retry may succeed
        (worker, finalize: the Job retries the index; controller: the operator starts another)
    42  EXIT_UNEVALUABLE: bad input (environment, a missing object, a model that cannot be
        loaded, no access): retrying cannot help; the evaluation Job fails the index at once
    43  EXIT_DEVICE_ERROR: the GPU failed (CUDA out of memory, a CUDA/NCCL error, an XID): not the
        candidates' fault; no result is written for them and the Job retries the index on
        another pod, keeping the results written before

A bug (any other exception) keeps its traceback and Python's exit code 1.
"""

from __future__ import annotations

import json
import os
import sys

from ..errors import DeviceFailed, UserError, is_device_error
from .manifests import EXIT_DEVICE_ERROR, EXIT_UNEVALUABLE

EXIT_TRANSIENT = 1

PRUNEJOB = "SELFPRUNER_PRUNEJOB"  # the controller's PruneJob, as JSON
UID = "SELFPRUNER_PRUNEJOB_UID"
STORE = "SELFPRUNER_STORE"
BATCH = "SELFPRUNER_BATCH"
INDEX = "JOB_COMPLETION_INDEX"  # set by Kubernetes in an Indexed Job's pods
MAX_ATTEMPTS = "AWS_MAX_ATTEMPTS"  # the standard AWS variable; botocore ignores it once a client config is given


class PodEnvError(UserError):
    """The pod's environment (or an object its environment points at) is not what its Job promised."""


class DeviceError(Exception):
    """The accelerator failed while evaluating; the candidates were not at fault."""


def _get(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise PodEnvError(f"{name} is not set; the pod's Job must set it (see cluster/manifests.py)")
    return value


def prunejob_document() -> dict:
    """The controller's PruneJob (`SELFPRUNER_PRUNEJOB`): a JSON object with metadata.name and .uid."""
    raw = _get(PRUNEJOB)
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise PodEnvError(f"{PRUNEJOB} is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise PodEnvError(f"{PRUNEJOB} must be a JSON object (a PruneJob), got a JSON {type(doc).__name__}")
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        raise PodEnvError(f"{PRUNEJOB} has no metadata object")
    for field in ("name", "uid"):
        if not isinstance(meta.get(field), str) or not meta[field]:
            raise PodEnvError(f"{PRUNEJOB} has no metadata.{field}")
    return doc


def namespace(doc: dict) -> str:
    return doc["metadata"].get("namespace") or os.environ.get("SELFPRUNER_NAMESPACE") or "default"


def prunejob_uid() -> str:
    return _get(UID)


def store_uri() -> str:
    return _get(STORE)


def batch() -> str:
    return _get(BATCH)


def completion_index() -> int:
    """This pod's index in an Indexed Job; 0 where Kubernetes sets none."""
    raw = os.environ.get(INDEX, "").strip() or "0"
    if not raw.isdigit():
        raise PodEnvError(f"{INDEX} must be a non-negative integer, got {raw!r}")
    return int(raw)


def store_options() -> dict:
    """Options for the pod's stores: endpoint and region as the Job sets them, and the retry
    budget from AWS_MAX_ATTEMPTS when set (the store passes its own otherwise)."""
    opts = {"endpoint_url": os.environ.get("AWS_ENDPOINT_URL") or None,
            "region": os.environ.get("AWS_DEFAULT_REGION") or None}
    raw = os.environ.get(MAX_ATTEMPTS, "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise PodEnvError(f"{MAX_ATTEMPTS} must be a positive integer, got {raw!r}")
        opts["max_attempts"] = int(raw)
    return opts


def kube_for(doc: dict):
    """The API client of the controller's namespace: in-cluster configuration, else a kubeconfig.
    Neither is a pod started wrongly (no ServiceAccount token mounted), not a lost API server."""
    from kubernetes.config import ConfigException

    from .kube import Kube

    try:
        return Kube(namespace(doc))
    except ConfigException as e:
        raise PodEnvError(f"no Kubernetes API configuration: not in a cluster (KUBERNETES_SERVICE_HOST "
                          f"and the ServiceAccount token) and no kubeconfig (KUBECONFIG): {one_line(e)}") from None


def check_prunejob(kube, doc: dict) -> dict:
    """The live PruneJob this controller was started for, found by name and checked by uid: gone,
    re-created under the same name, or not readable with the controller's ServiceAccount, there is
    nothing to run and nowhere to report (PodEnvError). An unreachable or overloaded API server
    raises the client's own error, which `is_transient` knows."""
    meta = doc["metadata"]
    where = f"PruneJob {namespace(doc)}/{meta['name']}"
    from .kube import http_status

    try:
        live = kube.read_prunejob(meta["name"])
    except Exception as e:
        if http_status(e) in (401, 403):
            raise PodEnvError(f"the controller may not read {where} ({http_status(e)} {getattr(e, 'reason', '')}); "
                              "check its ServiceAccount's RBAC") from None
        raise
    if live is None:
        raise PodEnvError(f"{where} (from {PRUNEJOB}) does not exist: deleted, or a wrong namespace")
    if (live.get("metadata") or {}).get("uid") != meta["uid"]:
        raise PodEnvError(f"{where} has uid {(live.get('metadata') or {}).get('uid')}, not {meta['uid']} "
                          f"from {PRUNEJOB}: this controller's PruneJob was deleted and re-created")
    return live


# -- what went wrong, and the exit code that says it ------------------------------------------


def is_transient(error: BaseException) -> bool:
    """The store or the API server unreachable or overloaded (after the clients' own retries)."""
    from ..storage import StorageError

    if isinstance(error, UserError):
        return False  # includes StorageAccessError: no bucket, no credentials, no permission
    if isinstance(error, (StorageError, ConnectionError, TimeoutError)):
        return True
    try:
        from .kube import is_transient as api_transient  # by HTTP status: 429, 5xx, a lost connection
    except ImportError:  # no Kubernetes client in this image: not an API error either
        return False
    return api_transient(error)


def one_line(error: BaseException | str) -> str:
    """The message on one line (a spec's several problems joined by '; ')."""
    text = str(error) if isinstance(error, str) or str(error) else type(error).__name__
    return "; ".join(" ".join(line.split()) for line in text.splitlines() if line.strip())


def run_pod(command: str, body) -> int:
    """Run `body()` (which returns the exit code) and turn what it raises into one line on
    stderr and the exit code the module docstring tables; a bug keeps its traceback."""
    try:
        return body()
    except DeviceFailed as e:  # a UserError for the CLI, which says it in one line; retried here
        print(f"selfpruner {command}: {one_line(e)}; exit {EXIT_DEVICE_ERROR}: the Job retries on another pod",
              file=sys.stderr)
        return EXIT_DEVICE_ERROR
    except UserError as e:
        print(f"selfpruner {command}: {one_line(e)}", file=sys.stderr)
        return EXIT_UNEVALUABLE
    except Exception as e:
        if isinstance(e, DeviceError) or is_device_error(e):
            print(f"selfpruner {command}: the device failed ({one_line(e)}); exit {EXIT_DEVICE_ERROR}: "
                  "the Job retries on another pod", file=sys.stderr)
            return EXIT_DEVICE_ERROR
        if is_transient(e):
            print(f"selfpruner {command}: transient failure, to be retried: {one_line(e)}", file=sys.stderr)
            return EXIT_TRANSIENT
        raise
