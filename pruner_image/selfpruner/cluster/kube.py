"""The few Kubernetes API calls the controller makes, on the official client.

Objects travel as plain dicts (`_preload_content=False`), the same dicts
`manifests` builds, so nothing is lost to the client's model classes.
"""

from __future__ import annotations

import json

from .manifests import owner_uids
from .status import GROUP, PLURAL, VERSION, merge_conditions, now


class JobConflict(Exception):
    """A Job of the name we need exists and is not ours: a deterministic failure."""


class Kube:
    def __init__(self, namespace: str, config_file: str | None = None):
        from kubernetes import client, config

        if config_file:  # an explicit kubeconfig (tests; running the controller from a workstation)
            config.load_kube_config(config_file=config_file)
        else:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
        self.namespace = namespace
        self.client = client
        self.api = client.ApiClient()
        self.batch = client.BatchV1Api(self.api)
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    @staticmethod
    def _json(resp) -> dict:
        return json.loads(resp.data)

    def _missing(self, e) -> bool:
        return isinstance(e, self.client.exceptions.ApiException) and e.status == 404

    def create_job(self, body: dict) -> dict:
        """Create, or return the Job of that name if it exists already and is ours (idempotent);
        a Job of that name owned by another PruneJob is an error, never adopted."""
        try:
            return self._json(self.batch.create_namespaced_job(self.namespace, body, _preload_content=False))
        except self.client.exceptions.ApiException as e:
            if e.status != 409:
                raise
        name = body["metadata"]["name"]
        existing = self.read_job(name)
        theirs = owner_uids(existing or {})
        if existing is not None and not (owner_uids(body) & theirs):
            raise JobConflict(f"Job {name} already exists and belongs to another owner ({', '.join(sorted(theirs)) or 'none'})")
        return existing

    def read_job(self, name: str) -> dict | None:
        try:
            return self._json(self.batch.read_namespaced_job(name, self.namespace, _preload_content=False))
        except self.client.exceptions.ApiException as e:
            if self._missing(e):
                return None
            raise

    def read_prunejob(self, name: str) -> dict | None:
        try:
            return self._json(self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                                        _preload_content=False))
        except self.client.exceptions.ApiException as e:
            if self._missing(e):
                return None
            raise

    def patch_status(self, name: str, status: dict) -> None:
        """Merge `status` into the PruneJob's; conditions merge by type with those there (a merge
        patch would replace the whole list, dropping the operator's)."""
        if "conditions" in status:
            live = self.read_prunejob(name) or {}
            status = {**status, "conditions": merge_conditions((live.get("status") or {}).get("conditions"),
                                                               status["conditions"])}
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace, PLURAL, name,
                                                          {"status": status})

    def event(self, prunejob: dict, reason: str, message: str, type_: str = "Normal") -> None:
        meta = prunejob["metadata"]
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": self.namespace},
            "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PruneJob", "name": meta["name"],
                               "namespace": self.namespace, "uid": meta.get("uid")},
            "reason": reason, "message": message[:1000], "type": type_,
            "source": {"component": "selfpruner-controller"},
            "firstTimestamp": now(), "lastTimestamp": now(), "count": 1,
        }
        self.core.create_namespaced_event(self.namespace, body)


def job_finished(job: dict) -> str | None:
    """'Complete', 'Failed' or None (still running / suspended)."""
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True":
            return c["type"]
    return None


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
