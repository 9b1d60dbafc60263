"""kopf handlers for PruneJobs. Idempotent: every handler looks at what exists before it
creates anything, so an operator restart in the middle of anything changes nothing."""

from __future__ import annotations

import os
import time

import kopf

from selfpruner import spec as spec_mod
from selfpruner.cluster import manifests
from selfpruner.cluster.kube import condition as _condition
from selfpruner.cluster.kube import job_finished

from . import defaults, metrics, policy

GROUP, VERSION, PLURAL = "selfpruner.io", "v1alpha1", "prunejobs"
TERMINAL = ("Succeeded", "Failed", "Invalid")
IMAGE = os.environ.get("SELFPRUNER_IMAGE", "selfpruner-pruner:latest")
SERVICE_ACCOUNT = os.environ.get("SELFPRUNER_CONTROLLER_SERVICE_ACCOUNT", "selfpruner-controller")
MAX_RESTARTS = int(os.environ.get("SELFPRUNER_MAX_CONTROLLER_RESTARTS", "3"))
INTERVAL = float(os.environ.get("SELFPRUNER_RECONCILE_INTERVAL", "5"))
DEFAULTS = defaults.load()
POLICY = policy.load()


def _merge_conditions(old: list, new: list) -> list:
    by_type = {c["type"]: c for c in old or []}
    for c in new:
        prev = by_type.get(c["type"])
        if prev and prev.get("status") == c["status"]:
            c = {**c, "lastTransitionTime": prev.get("lastTransitionTime", c["lastTransitionTime"])}
        by_type[c["type"]] = c
    return list(by_type.values())


def _batch():
    from kubernetes import client

    return client.BatchV1Api()


def _read_job(name: str, namespace: str) -> dict | None:
    from kubernetes import client

    try:
        return _batch().read_namespaced_job(name, namespace).to_dict()
    except client.exceptions.ApiException as e:
        if e.status == 404:
            return None
        raise


def _start_controller(body, attempt: int, logger) -> str:
    from kubernetes import client

    pj = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": dict(body["metadata"]),
          "spec": defaults.apply(body["spec"], DEFAULTS)[0]}
    job = manifests.controller_job(pj, image=IMAGE, service_account=SERVICE_ACCOUNT, attempt=attempt)
    name = job["metadata"]["name"]
    existing = _read_job(name, body["metadata"]["namespace"])
    if existing is None:
        try:
            _batch().create_namespaced_job(body["metadata"]["namespace"], job)
            logger.info(f"created controller Job {name}")
            return name
        except client.exceptions.ApiException as e:
            if e.status != 409:
                raise
            existing = _read_job(name, body["metadata"]["namespace"])
    if existing is not None and not manifests.owned_by(existing, pj):
        # never adopt another PruneJob's controller: that would mix two searches' state
        raise ChildConflict(f"controller Job {name} already exists and belongs to another PruneJob")
    return name


class ChildConflict(Exception):
    """A child's name is taken by another owner's object: deterministic, never retried."""


def _fail(body, meta, status, patch, key: str, reason: str, message: str) -> None:
    patch.status["phase"] = "Failed"
    patch.status["conditions"] = _merge_conditions(status.get("conditions"), [
        _condition("Failed", "True", reason, message, meta.get("generation"))])
    metrics.record_phase(key, "Failed")
    kopf.warn(body, reason="Failed", message=message)


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_):
    settings.posting.level = 20  # INFO and up become Kubernetes events
    port = os.environ.get("SELFPRUNER_METRICS_PORT")
    if port:
        metrics.serve(int(port))


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
def start(body, meta, status, patch, logger, **_):
    key = f"{meta['namespace']}/{meta['name']}"
    phase = status.get("phase")
    if phase in TERMINAL:
        metrics.record_phase(key, phase)
        return
    start_time = time.perf_counter()
    try:
        spec, from_defaults = defaults.apply(body.get("spec") or {}, DEFAULTS)
        try:
            spec_mod.parse({"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                            "metadata": dict(meta), "spec": spec})
            if not spec.get("storage"):
                raise spec_mod.UserError("spec.storage: required on a cluster (where weights, results and the "
                                         "search state live); set it, or the chart's defaults.storage")
            policy.check(spec, POLICY, DEFAULTS, IMAGE)
        except spec_mod.UserError as e:
            message = "; ".join(str(e).splitlines())
            patch.status["phase"] = "Invalid"
            patch.status["conditions"] = _merge_conditions(status.get("conditions"), [
                _condition("Invalid", "True", "SpecInvalid", message, meta.get("generation"))])
            metrics.record_phase(key, "Invalid")
            kopf.warn(body, reason="Invalid", message=message)
            raise kopf.PermanentError(f"invalid PruneJob: {message}")
        if from_defaults and not status.get("controllerJob"):
            kopf.info(body, reason="DefaultsApplied",
                      message=f"from the installation's defaults: {', '.join(from_defaults)}")
        attempt = status.get("restarts", 0)
        try:
            name = _start_controller(body, attempt, logger)
        except ChildConflict as e:
            _fail(body, meta, status, patch, key, "JobConflict", str(e))
            raise kopf.PermanentError(str(e)) from None
        new_phase = "Suspended" if body["spec"].get("suspend") else (phase or "Pending")
        patch.status["phase"] = new_phase
        patch.status["controllerJob"] = name
        patch.status.setdefault("restarts", attempt)
        patch.status["conditions"] = _merge_conditions(status.get("conditions"), [
            _condition("ControllerStarted", "True", "JobCreated", f"controller Job {name}", meta.get("generation"))])
        metrics.record_phase(key, new_phase)
        kopf.info(body, reason="ControllerStarted", message=f"controller Job {name}")
    finally:
        metrics.reconcile_seconds.observe(time.perf_counter() - start_time)


@kopf.timer(GROUP, VERSION, PLURAL, interval=INTERVAL, initial_delay=INTERVAL)
def reconcile(body, meta, status, patch, logger, **_):
    """Mirror the controller Job into the phase; start a new one when it is lost."""
    key = f"{meta['namespace']}/{meta['name']}"
    phase = status.get("phase")
    metrics.record_phase(key, phase)
    if phase in TERMINAL or not status.get("controllerJob"):
        return
    start_time = time.perf_counter()
    try:
        job = _read_job(status["controllerJob"], meta["namespace"])
        state = job_finished(_camel(job)) if job else None
        if job is not None and state is None:
            if body["spec"].get("suspend") and phase != "Suspended":
                patch.status["phase"] = "Suspended"
            elif not body["spec"].get("suspend") and phase in ("Pending", "Suspended"):
                patch.status["phase"] = "Running"
            return
        if state == "Complete":
            return  # the controller writes the final status itself; nothing to restart
        restarts = status.get("restarts", 0)
        if restarts >= MAX_RESTARTS:
            _fail(body, meta, status, patch, key, "ControllerLost",
                  f"the controller was lost {restarts + 1} times; giving up")
            return
        try:
            name = _start_controller(body, restarts + 1, logger)
        except ChildConflict as e:
            _fail(body, meta, status, patch, key, "JobConflict", str(e))
            return
        patch.status["restarts"] = restarts + 1
        patch.status["controllerJob"] = name
        metrics.controller_restarts.inc()
        kopf.warn(body, reason="ControllerRestarted",
                  message=f"controller Job {'lost' if job is None else 'failed'}; started {name}, "
                          f"which resumes from storage")
    except Exception:
        metrics.reconcile_errors.inc()
        raise
    finally:
        metrics.reconcile_seconds.observe(time.perf_counter() - start_time)


@kopf.on.field(GROUP, VERSION, PLURAL, field="spec.suspend")
def suspend_changed(body, meta, new, logger, **_):
    """Suspend (or resume) the PruneJob's running evaluation and finalize Jobs."""
    from kubernetes import client

    batch = _batch()
    selector = f"{manifests.PRUNEJOB_LABEL}={meta['name']}"
    for job in batch.list_namespaced_job(meta["namespace"], label_selector=selector).items:
        component = (job.metadata.labels or {}).get("app.kubernetes.io/component")
        if component in ("evaluator", "finalize") and not (job.status and job.status.completion_time):
            try:
                batch.patch_namespaced_job(job.metadata.name, meta["namespace"], {"spec": {"suspend": bool(new)}})
            except client.exceptions.ApiException as e:
                logger.warning(f"could not {'suspend' if new else 'resume'} {job.metadata.name}: {e.reason}")


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def deleted(meta, **_):
    metrics.record_phase(f"{meta['namespace']}/{meta['name']}", None)


def _camel(job: dict) -> dict:
    """The client's to_dict() is snake_case; job_finished reads the API's shape."""
    conditions = ((job.get("status") or {}).get("conditions")) or []
    return {"status": {"conditions": [{"type": c.get("type"), "status": c.get("status")} for c in conditions]}}
