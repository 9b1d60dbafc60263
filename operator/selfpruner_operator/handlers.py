"""kopf handlers for PruneJobs. Idempotent: every handler looks at what exists before it
creates anything, so an operator restart in the middle of anything changes nothing.

Every API call goes through `selfpruner.cluster.kube` (plain dicts, retries on throttling and
server errors); the installation's policy is checked before every controller Job is started,
not only at admission."""

from __future__ import annotations

import logging
import os
import time

import kopf

from selfpruner import spec as spec_mod
from selfpruner.cluster import defaults, manifests, policy, status as st
from selfpruner.cluster.kube import ChildConflict, Kube, job_failure, job_finished, job_has_pods, job_stuck
from selfpruner.cluster.status import GROUP, PLURAL, TERMINAL, VERSION

from . import metrics

IMAGE = os.environ.get("SELFPRUNER_IMAGE", "selfpruner-pruner:latest")
SERVICE_ACCOUNT = os.environ.get("SELFPRUNER_CONTROLLER_SERVICE_ACCOUNT", "selfpruner-controller")
# controller restarts in a row without progress (no evaluation finished in between) before giving up
MAX_RESTARTS = int(os.environ.get("SELFPRUNER_MAX_CONTROLLER_RESTARTS", "3"))
INTERVAL = float(os.environ.get("SELFPRUNER_RECONCILE_INTERVAL", "5"))
# how long the controller pod may wait for an image, a Secret or a node before the PruneJob fails
START_TIMEOUT = float(os.environ.get("SELFPRUNER_CONTROLLER_START_TIMEOUT", "600"))
DEFAULTS = defaults.load()
POLICY = policy.load()
PODS = manifests.pod_settings()  # a bad chart value stops the operator here, not at the first PruneJob
PENDING_CONDITION = "ControllerPending"


class Refused(Exception):
    """The spec leaves the installation's boundary (at admission or at a later controller start)."""


def _document(body) -> dict:
    """The PruneJob with the installation's defaults applied, as its controller gets it."""
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": dict(body["metadata"]),
            "spec": defaults.apply(body.get("spec") or {}, DEFAULTS)[0]}


def _admit(body, meta) -> list[str]:
    """Check the defaulted spec (schema, storage); returns the fields taken from defaults. The policy
    is checked where every controller is started (`_start_controller`)."""
    spec, from_defaults = defaults.apply(body.get("spec") or {}, DEFAULTS)
    try:
        spec_mod.parse({"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                        "metadata": dict(meta), "spec": spec})
        if not spec.get("storage"):
            raise spec_mod.UserError("spec.storage: required on a cluster (where weights, results and the "
                                     "search state live); set it, or the chart's defaults.storage")
    except spec_mod.UserError as e:
        raise Refused("; ".join(str(e).splitlines())) from None
    return from_defaults


def _start_controller(body, attempt: int, logger) -> str:
    """Create the controller Job number `attempt` (or find it): the policy is checked again first,
    on the spec as it is now, and on the Job itself."""
    pj = _document(body)
    job = manifests.controller_job(pj, image=IMAGE, service_account=SERVICE_ACCOUNT, attempt=attempt,
                                   policy=POLICY, installation=DEFAULTS, pods=PODS)
    try:
        policy.check_job(job, pj["spec"], POLICY, DEFAULTS, IMAGE)
    except spec_mod.UserError as e:
        raise Refused("; ".join(str(e).splitlines())) from None
    kube = Kube(body["metadata"]["namespace"])
    name = job["metadata"]["name"]
    existing = kube.read_job(name)
    if existing is None:
        kube.create_job(job)
        logger.info(f"created controller Job {name}")
    elif not manifests.owned_by(existing, pj):
        # never adopt another PruneJob's controller: that would mix two searches' state
        raise ChildConflict(f"controller Job {name} already exists and belongs to another PruneJob")
    return name


def _event(body, reason: str, message: str) -> None:
    """A Normal event (kopf.info would be filtered: only warnings are posted from logs)."""
    kopf.event(body, type="Normal", reason=reason, message=message)


def _fail(body, meta, status, patch, key: str, reason: str, message: str, phase: str = st.FAILED) -> None:
    failed = st.failed(reason, message, meta.get("generation"), status.get("conditions"))
    if phase == st.INVALID:
        failed = {"phase": st.INVALID, "conditions": st.merge_conditions(status.get("conditions"), [
            st.condition(st.RUNNING, "False", reason, message, meta.get("generation")),
            st.condition(st.INVALID, "True", reason, message, meta.get("generation"))])}
    patch.status.update(failed)
    patch.status["observedGeneration"] = meta.get("generation")
    metrics.record_phase(key, phase)
    kopf.warn(body, reason=phase, message=f"{reason}: {message}")
    # the operator decided this, not the controller: a controller still running would go on building
    # Jobs (and writing a phase over this one); its GPU Jobs are stopped by the next reconciliation
    _stop_children(meta, logging.getLogger(__name__), components=("controller",))


def _stop_children(meta, logger, components=("evaluator", "finalize")) -> int:
    """Delete the PruneJob's unfinished GPU Jobs (and so their pods): a finished PruneJob holds no
    GPU. The controller Job, which ends by itself after its verdict, keeps its pod's log. Results,
    state and the checkpoint stay in storage."""
    kube, stopped = Kube(meta["namespace"]), 0
    for job in kube.list_jobs(manifests.children_selector(meta)):
        if job_finished(job) or (job["metadata"].get("labels") or {}).get(manifests.COMPONENT_LABEL) not in components:
            continue
        if kube.delete_job(job["metadata"]["name"]):
            stopped += 1
            logger.info(f"deleted unfinished Job {job['metadata']['name']}")
    return stopped


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_):
    # only warnings become Events from logs: a handler's INFO lines (and, in kopf versions that post
    # them, each timer run's) would otherwise be Events per PruneJob per interval; our Normal events
    # are posted explicitly (_event)
    settings.posting.level = logging.WARNING
    # kopf's own bookkeeping in annotations only: the CRD's status schema does not declare
    # `status.kopf`, and a real API server prunes what its schema does not declare
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage()
    # without the chart's rules for it (rbac.scope namespaced, or rbac.observeCRDs off) kopf must not
    # scan: it would list namespaces, and retry the refusal for about a minute before serving anything
    settings.scanning.disabled = os.environ.get("SELFPRUNER_KOPF_SCANNING", "true") == "false"
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
        try:
            from_defaults = _admit(body, meta)
            attempt = status.get("restarts", 0)
            name = _start_controller(body, attempt, logger)
        except Refused as e:
            _fail(body, meta, status, patch, key, "SpecInvalid", str(e), phase=st.INVALID)
            raise kopf.PermanentError(f"invalid PruneJob: {e}") from None
        except ChildConflict as e:
            _fail(body, meta, status, patch, key, "JobConflict", str(e))
            raise kopf.PermanentError(str(e)) from None
        if from_defaults and not status.get("controllerJob"):
            _event(body, "DefaultsApplied", f"from the installation's defaults: {', '.join(from_defaults)}")
        new_phase = st.SUSPENDED if body["spec"].get("suspend") else (phase or st.PENDING)
        patch.status["phase"] = new_phase
        patch.status["controllerJob"] = name
        patch.status["observedGeneration"] = meta.get("generation")
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
            stopped = _stop_children(meta, logger)
            if stopped:
                kopf.warn(body, reason="ChildrenStopped", message=f"{phase}: deleted {stopped} unfinished Job(s)")
            if not status.get("childrenStopped"):
                # the first reconciliation of this finished PruneJob: counted once (metrics.record_finished)
                metrics.record_finished(meta["uid"], meta["namespace"], phase,
                                        st.failure_reason(status.get("conditions")))
            patch.status["childrenStopped"] = True
            return
        if not status.get("controllerJob"):
            return
        if status.get("observedGeneration") != meta.get("generation"):
            patch.status["observedGeneration"] = meta.get("generation")  # this run acts on the spec as it is now
        kube = Kube(meta["namespace"])
        job = kube.read_job(status["controllerJob"])
        state = job_finished(job)
        if job is not None and state is None:
            stuck = _watch_start(kube, body, meta, status, patch, key, job, logger)
            if patch.status.get("phase") == st.FAILED:
                return
            # Pending while the controller pod cannot start (the Running condition says why), a new
            # one after a loss included
            want = st.SUSPENDED if body["spec"].get("suspend") else st.PENDING if stuck else st.RUNNING
            if want != phase:
                patch.status["phase"] = want
            return
        if state == "Complete":
            return  # the controller writes the final status itself; nothing to restart
        if job_has_pods(job):
            return  # its pod is still there: never two controllers at once
        _restart(body, meta, status, patch, key, job, logger)
    except Exception:
        metrics.reconcile_errors.inc()
        raise
    finally:
        metrics.reconcile_seconds.observe(time.perf_counter() - start_time)


def _restart(body, meta, status, patch, key: str, job: dict | None, logger) -> None:
    """Start a controller in place of a lost one, within a budget of restarts in a row without
    progress: a search that keeps finishing evaluations between losses (a multi-day search on a
    cluster with blips) is never given up on, one that cannot get anywhere is, in bounded time."""
    restarts = status.get("restarts", 0)
    evaluations = status.get("evaluations") or 0
    progressed = evaluations > (status.get("evaluationsAtRestart") or 0)
    without_progress = 0 if progressed else status.get("restartsWithoutProgress", 0)
    why = f"failed ({job_failure(job)})" if job_failure(job) else ("lost (its Job is gone)" if job is None else "failed")
    if job_failure(job).startswith("PodFailurePolicy"):
        # the controller exited EXIT_UNEVALUABLE: it could not identify or reach its PruneJob, and a
        # new controller would not either (its one line is the last of its pod's log)
        _fail(body, meta, status, patch, key, "ControllerCannotRun",
              f"the controller stopped on input no retry can fix ({job_failure(job)}); its pod's log says which")
        return
    if without_progress >= MAX_RESTARTS:
        _fail(body, meta, status, patch, key, "ControllerLost",
              f"the controller was lost {without_progress + 1} times in a row without progress ({why}); giving up")
        return
    try:
        name = _start_controller(body, restarts + 1, logger)
    except Refused as e:
        _fail(body, meta, status, patch, key, "PolicyViolation", f"the controller was not restarted: {e}")
        return
    except ChildConflict as e:
        _fail(body, meta, status, patch, key, "JobConflict", str(e))
        return
    patch.status["restarts"] = restarts + 1
    patch.status["restartsWithoutProgress"] = without_progress + 1
    patch.status["evaluationsAtRestart"] = evaluations
    patch.status["controllerJob"] = name
    metrics.controller_restarts.inc()
    kopf.warn(body, reason="ControllerRestarted", message=f"controller Job {why}; started {name}, which resumes from storage")


def _watch_start(kube: Kube, body, meta, status, patch, key: str, job: dict, logger) -> bool:
    """A controller pod stuck before it runs (no image, no Secret, no node, or no pod at all) is a
    condition and a warning at once, and the PruneJob fails after START_TIMEOUT seconds of it.
    The Running condition says so too (False, with the pod's reason: `kubectl get pj`'s Reason).
    Returns whether the pod is stuck."""
    waiting = job_stuck(kube, job)
    previous = st.find(status.get("conditions"), PENDING_CONDITION)
    if waiting is None:
        if previous and previous.get("status") == "True":
            patch.status["conditions"] = st.merge_conditions(status.get("conditions"), [
                st.condition(PENDING_CONDITION, "False", "Started", "the controller pod started", meta.get("generation"))])
        return False
    reason, message = waiting
    stuck_for = st.seconds_since(previous.get("lastTransitionTime")) if previous and previous.get("status") == "True" else 0
    if stuck_for >= START_TIMEOUT:
        _fail(body, meta, status, patch, key, "ControllerNotStarting",
              f"the controller pod did not start in {START_TIMEOUT:.0f} s: {message}")
        return True
    patch.status["conditions"] = st.merge_conditions(status.get("conditions"), [
        st.condition(PENDING_CONDITION, "True", reason, message, meta.get("generation")),
        st.condition(st.RUNNING, "False", reason, f"the controller pod cannot start: {message}",
                     meta.get("generation"))])
    if not previous or previous.get("reason") != reason or previous.get("status") != "True":
        kopf.warn(body, reason=PENDING_CONDITION, message=message)
    return True


@kopf.on.field(GROUP, VERSION, PLURAL, field="spec.suspend")
def suspend_changed(body, meta, status, patch, new, logger, **_):
    """Suspend (or resume) the PruneJob's running evaluation and finalize Jobs."""
    if status.get("phase") not in TERMINAL and status.get("observedGeneration") != meta.get("generation"):
        patch.status["observedGeneration"] = meta.get("generation")
    kube = Kube(meta["namespace"])
    for job in kube.list_jobs(manifests.children_selector(meta)):
        component = (job["metadata"].get("labels") or {}).get(manifests.COMPONENT_LABEL)
        if component in ("evaluator", "finalize") and not job_finished(job):
            try:
                kube.patch_job(job["metadata"]["name"], {"spec": {"suspend": bool(new)}})
            except Exception as e:  # noqa: BLE001 - one Job that went away must not stop the others
                logger.warning(f"could not {'suspend' if new else 'resume'} {job['metadata']['name']}: {e}")


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def deleted(meta, **_):
    metrics.record_phase(f"{meta['namespace']}/{meta['name']}", None)
    metrics.forget(meta.get("uid"))
