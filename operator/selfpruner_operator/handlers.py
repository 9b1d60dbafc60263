"""kopf handlers for PruneJobs. Idempotent: every handler looks at what exists before it
creates anything, so an operator restart in the middle of anything changes nothing."""

from __future__ import annotations

import logging
import os
import time

import kopf

from selfpruner import spec as spec_mod
from selfpruner.cluster import manifests, status as st
from selfpruner.cluster.kube import job_finished
from selfpruner.cluster.status import GROUP, PLURAL, TERMINAL, VERSION

from . import defaults, metrics, policy

IMAGE = os.environ.get("SELFPRUNER_IMAGE", "selfpruner-pruner:latest")
SERVICE_ACCOUNT = os.environ.get("SELFPRUNER_CONTROLLER_SERVICE_ACCOUNT", "selfpruner-controller")
MAX_RESTARTS = int(os.environ.get("SELFPRUNER_MAX_CONTROLLER_RESTARTS", "3"))
INTERVAL = float(os.environ.get("SELFPRUNER_RECONCILE_INTERVAL", "5"))
# how long the controller pod may wait for an image, a Secret or a node before the PruneJob fails
START_TIMEOUT = float(os.environ.get("SELFPRUNER_CONTROLLER_START_TIMEOUT", "600"))
DEFAULTS = defaults.load()
POLICY = policy.load()
# pod waiting reasons no wait will cure by itself (a missing image, Secret or ServiceAccount)
STUCK = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
         "CreateContainerError", "ErrImageNeverPull"}
PENDING_CONDITION = "ControllerPending"


def _batch():
    from kubernetes import client

    return client.BatchV1Api()


def _core():
    from kubernetes import client

    return client.CoreV1Api()


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


def _event(body, reason: str, message: str) -> None:
    """A Normal event (kopf.info would be filtered: only warnings are posted from logs)."""
    kopf.event(body, type="Normal", reason=reason, message=message)


def _fail(body, meta, status, patch, key: str, reason: str, message: str) -> None:
    patch.status.update(st.failed(reason, message, meta.get("generation"), status.get("conditions")))
    metrics.record_phase(key, st.FAILED)
    kopf.warn(body, reason=st.FAILED, message=f"{reason}: {message}")


def _stop_children(meta, logger, components=("evaluator", "finalize")) -> int:
    """Delete the PruneJob's unfinished GPU Jobs (and so their pods): a finished PruneJob holds no
    GPU. The controller Job, which ends by itself after its verdict, keeps its pod's log. Results,
    state and the checkpoint stay in storage."""
    from kubernetes import client

    batch, stopped = _batch(), 0
    for job in batch.list_namespaced_job(meta["namespace"], label_selector=manifests.children_selector(meta)).items:
        done = any(c.type in ("Complete", "Failed") and c.status == "True" for c in (job.status.conditions or []))
        if done or (job.metadata.labels or {}).get(manifests.COMPONENT_LABEL) not in components:
            continue
        try:
            batch.delete_namespaced_job(job.metadata.name, meta["namespace"], propagation_policy="Background")
            stopped += 1
            logger.info(f"deleted unfinished Job {job.metadata.name}")
        except client.exceptions.ApiException as e:
            if e.status != 404:
                raise
    return stopped


def _waiting(job_name: str, namespace: str) -> tuple[str, str] | None:
    """(reason, message) when the controller pod cannot start: a container waiting for a reason no
    wait cures, or a pod the scheduler cannot place."""
    pods = _core().list_namespaced_pod(namespace, label_selector=f"job-name={job_name}").items
    for pod in pods:
        for cs in (pod.status.container_statuses or []) if pod.status else []:
            waiting = cs.state.waiting if cs.state else None
            if waiting and waiting.reason in STUCK:
                return waiting.reason, f"pod {pod.metadata.name}: {waiting.reason}: {waiting.message or ''}".strip()
        for c in (pod.status.conditions or []) if pod.status else []:
            if c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable":
                return "Unschedulable", f"pod {pod.metadata.name}: {c.message or 'cannot be scheduled'}"
    return None


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_):
    # only warnings become Events from logs: a handler's INFO lines (and, in kopf versions that post
    # them, each timer run's) would otherwise be Events per PruneJob per interval; our Normal events
    # are posted explicitly (_event)
    settings.posting.level = logging.WARNING
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
            patch.status["phase"] = st.INVALID
            patch.status["conditions"] = st.merge_conditions(status.get("conditions"), [
                st.condition(st.INVALID, "True", "SpecInvalid", message, meta.get("generation"))])
            metrics.record_phase(key, st.INVALID)
            kopf.warn(body, reason="Invalid", message=message)
            raise kopf.PermanentError(f"invalid PruneJob: {message}")
        if from_defaults and not status.get("controllerJob"):
            _event(body, "DefaultsApplied", f"from the installation's defaults: {', '.join(from_defaults)}")
        attempt = status.get("restarts", 0)
        try:
            name = _start_controller(body, attempt, logger)
        except ChildConflict as e:
            _fail(body, meta, status, patch, key, "JobConflict", str(e))
            raise kopf.PermanentError(str(e)) from None
        new_phase = st.SUSPENDED if body["spec"].get("suspend") else (phase or st.PENDING)
        patch.status["phase"] = new_phase
        patch.status["controllerJob"] = name
        patch.status.setdefault("restarts", attempt)
        patch.status["conditions"] = st.merge_conditions(status.get("conditions"), [
            st.condition("ControllerStarted", "True", "JobCreated", f"controller Job {name}", meta.get("generation"))])
        metrics.record_phase(key, new_phase)
        if status.get("controllerJob") != name:
            _event(body, "ControllerStarted", f"controller Job {name}")
    finally:
        metrics.reconcile_seconds.observe(time.perf_counter() - start_time)


def _active(status, **_) -> bool:
    """Timers run until the PruneJob has finished and its children are stopped."""
    return status.get("phase") not in TERMINAL or not status.get("childrenStopped")


@kopf.timer(GROUP, VERSION, PLURAL, interval=INTERVAL, initial_delay=INTERVAL, when=_active)
def reconcile(body, meta, status, patch, logger, **_):
    """Mirror the controller Job into the phase; surface a controller pod that cannot start; start
    a new controller when it is lost; stop the children of a finished PruneJob."""
    key = f"{meta['namespace']}/{meta['name']}"
    phase = status.get("phase")
    metrics.record_phase(key, phase)
    start_time = time.perf_counter()
    try:
        if phase in TERMINAL:
            # a search that succeeded has no unfinished work (its finalize Job may not say Complete yet)
            stopped = _stop_children(meta, logger) if phase != st.SUCCEEDED else 0
            if stopped:
                kopf.warn(body, reason="ChildrenStopped", message=f"{phase}: deleted {stopped} unfinished Job(s)")
            patch.status["childrenStopped"] = True
            return
        if not status.get("controllerJob"):
            return
        job = _read_job(status["controllerJob"], meta["namespace"])
        state = job_finished(_camel(job)) if job else None
        if job is not None and state is None:
            _watch_start(body, meta, status, patch, key, job, logger)
            if patch.status.get("phase") == st.FAILED:
                return
            if body["spec"].get("suspend") and phase != st.SUSPENDED:
                patch.status["phase"] = st.SUSPENDED
            elif not body["spec"].get("suspend") and phase in (st.PENDING, st.SUSPENDED):
                patch.status["phase"] = st.RUNNING
            return
        if state == "Complete":
            return  # the controller writes the final status itself; nothing to restart
        if job is not None and ((job.get("status") or {}).get("active") or (job.get("status") or {}).get("terminating")):
            return  # its pod is still there: never two controllers at once
        restarts = status.get("restarts", 0)
        why = _job_failure(job)
        if restarts >= MAX_RESTARTS:
            _fail(body, meta, status, patch, key, "ControllerLost",
                  f"the controller was lost {restarts + 1} times ({why}); giving up")
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
                  message=f"controller Job {why}; started {name}, which resumes from storage")
    except Exception:
        metrics.reconcile_errors.inc()
        raise
    finally:
        metrics.reconcile_seconds.observe(time.perf_counter() - start_time)


def _watch_start(body, meta, status, patch, key: str, job: dict, logger) -> None:
    """A controller pod stuck before it runs (no image, no Secret, no node) is a condition and a
    warning at once, and the PruneJob fails after START_TIMEOUT seconds of it."""
    waiting = _waiting(job["metadata"]["name"], meta["namespace"])
    previous = st.find(status.get("conditions"), PENDING_CONDITION)
    if waiting is None:
        if previous and previous.get("status") == "True":
            patch.status["conditions"] = st.merge_conditions(status.get("conditions"), [
                st.condition(PENDING_CONDITION, "False", "Started", "the controller pod started", meta.get("generation"))])
        return
    reason, message = waiting
    stuck_for = st.seconds_since(previous.get("lastTransitionTime")) if previous and previous.get("status") == "True" else 0
    if stuck_for >= START_TIMEOUT:
        _fail(body, meta, status, patch, key, "ControllerNotStarting",
              f"the controller pod did not start in {START_TIMEOUT:.0f} s: {message}")
        _stop_children(meta, logger, components=("controller",))
        return
    conditions = st.merge_conditions(status.get("conditions"), [
        st.condition(PENDING_CONDITION, "True", reason, message, meta.get("generation"))])
    patch.status["conditions"] = conditions
    if not previous or previous.get("reason") != reason or previous.get("status") != "True":
        kopf.warn(body, reason=PENDING_CONDITION, message=message)


def _job_failure(job: dict | None) -> str:
    if job is None:
        return "lost (its Job is gone)"
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Failed" and c.get("status") == "True":
            return f"failed ({c.get('reason') or 'no reason'}: {c.get('message') or ''})".replace(": )", ")")
    return "failed"


@kopf.on.field(GROUP, VERSION, PLURAL, field="spec.suspend")
def suspend_changed(body, meta, new, logger, **_):
    """Suspend (or resume) the PruneJob's running evaluation and finalize Jobs."""
    from kubernetes import client

    batch = _batch()
    for job in batch.list_namespaced_job(meta["namespace"], label_selector=manifests.children_selector(meta)).items:
        component = (job.metadata.labels or {}).get(manifests.COMPONENT_LABEL)
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
