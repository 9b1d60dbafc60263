"""The Job controller: what Kubernetes' kube-controller-manager does for batch/v1 Jobs."""

from __future__ import annotations

import collections
import pathlib
import subprocess
import time
import traceback
import uuid
from collections.abc import Iterable
from typing import Any

from .apiserver import _now
from .client import ClusterApiError

def _job_condition(job: dict[str, Any], ctype: str) -> bool:
    return any(c.get("type") == ctype and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


def _compress(indexes: Iterable[int]) -> str:
    """{0,1,2,5} -> '0-2,5' (the Job controller's interval notation)."""
    out, run = [], []
    for i in sorted(set(indexes)):
        if run and i == run[-1] + 1:
            run.append(i)
        else:
            if run:
                out.append(f"{run[0]}-{run[-1]}" if len(run) > 2 else ",".join(map(str, run)))
            run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 2 else ",".join(map(str, run)))
    return ",".join(out)


class Pod:
    def __init__(self, job: "JobRun", index: int, attempt: int):
        self.job, self.index, self.attempt = job, index, attempt
        suffix = "".join(uuid.uuid4().hex[:5])
        self.name = f"{job.name}-{index}-{suffix}" if job.indexed else f"{job.name}-{suffix}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: pathlib.Path | None = None
        self.preempted = False
        self.exit_code: int | None = None


class JobRun:
    """One Job's pods and the Job controller's bookkeeping."""

    def __init__(self, job: dict[str, Any]):
        meta, spec = job["metadata"], job.get("spec") or {}
        self.uid, self.name, self.namespace = meta["uid"], meta["name"], meta.get("namespace", "default")
        self.spec = spec
        self.indexed = spec.get("completionMode") == "Indexed"
        self.completions = int(spec.get("completions") or 1)
        self.parallelism = int(spec.get("parallelism") if spec.get("parallelism") is not None else 1)
        self.backoff_limit = spec.get("backoffLimit")
        self.per_index = spec.get("backoffLimitPerIndex")
        self.max_failed_indexes = spec.get("maxFailedIndexes")
        self.deadline = spec.get("activeDeadlineSeconds")
        self.policy = (spec.get("podFailurePolicy") or {}).get("rules") or []
        self.pods: dict[int, Pod] = {}                    # running, by index (or ordinal)
        self.succeeded: set[int] = set()
        self.failed_indexes: set[int] = set()
        self.index_failures: collections.Counter[int] = collections.Counter()
        self.failed_pods = 0                               # counted failures (status.failed)
        self.ignored_failures = 0
        self.retry_at: dict[int, float] = {}
        self.attempts: collections.Counter[int] = collections.Counter()
        self.start_time: str | None = None
        self.started_mono: float | None = None
        self.finished: str | None = None                   # 'Complete' | 'Failed'
        self.finish_reason = ""
        self.finish_message = ""
        self.completion_time: str | None = None
        self.last_status: dict[str, Any] | None = None
        self.waiting_reason: dict[int, str] = {}
        self.waiting_pod: dict[int, str] = {}             # index -> name of its Pod object while waiting
        self.all_pods: list[Pod] = []
        self.suspended: bool | None = None               # None: never suspended (no Suspended condition)
        self.suspended_at: str | None = None
        self.failed_create: str | None = None              # the last FailedCreate message posted

    def pending_indexes(self) -> list[int]:
        done = self.succeeded | self.failed_indexes | set(self.pods)
        if self.indexed:
            return [i for i in range(self.completions) if i not in done]
        need = self.completions - len(self.succeeded) - len(self.pods)
        free = [i for i in range(self.completions) if i not in done]
        return free[:max(need, 0)]


class JobController:
    """The Job controller for batch/v1 Jobs: pods started per index, failures counted against
    backoffLimit / backoffLimitPerIndex and podFailurePolicy, suspension, activeDeadlineSeconds,
    the Job's status. Starting and killing pods is the kubelet's (`Kubelet`, its subclass)."""

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - keep playing kubelet; keep the error for the test
                self.errors.append(traceback.format_exc())
                if len(self.errors) > 50:
                    del self.errors[:25]
            self._stop.wait(self.poll_interval)

    def _tick(self) -> None:
        try:
            jobs = self.cluster.list("jobs", namespace="*")
        except (ClusterApiError, OSError):
            return
        seen = set()
        for job in jobs:
            uid = job["metadata"]["uid"]
            seen.add(uid)
            with self.lock:
                run = self.jobs.get(uid)
                if run is None:
                    if _job_condition(job, "Complete") or _job_condition(job, "Failed"):
                        continue
                    run = self.jobs[uid] = JobRun(job)
            self._sync(run, job)
        with self.lock:
            gone = [uid for uid in self.jobs if uid not in seen]
            for uid in gone:                  # deleted Jobs: kill their pods
                run = self.jobs.pop(uid)
                for pod in list(run.pods.values()):
                    self._kill(pod)
                    run.pods.pop(pod.index, None)

    def _sync(self, run: JobRun, job: dict[str, Any]) -> None:
        if run.finished:
            self._write_status(run)
            return
        suspended = bool((job.get("spec") or {}).get("suspend"))
        now = time.monotonic()
        with self.lock:
            # Reap exited pods.
            for index, pod in list(run.pods.items()):
                if pod.proc is None or pod.proc.poll() is None:
                    continue
                code = pod.proc.returncode
                pod.exit_code = 128 + (-code) if code < 0 else code
                del run.pods[index]
                self._account(run, pod)
                if run.finished:
                    break
            if suspended and not run.finished:
                self._delete_active(run)
                run.start_time = None if not run.succeeded and not run.failed_pods else run.start_time
            resumed = run.suspended is True and not suspended
            if suspended != run.suspended and (suspended or run.suspended is not None):
                run.suspended, run.suspended_at = suspended, _now()
            if not run.finished and not suspended:
                # a resume always restarts the activeDeadlineSeconds timer, as the Job controller does
                if run.start_time is None or resumed:
                    run.start_time, run.started_mono = _now(), now
                if run.deadline is not None and run.started_mono is not None \
                        and now - run.started_mono > float(run.deadline):
                    self._finish(run, "Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
                elif run.indexed and run.succeeded | run.failed_indexes >= set(range(run.completions)) \
                        or not run.indexed and len(run.succeeded) >= run.completions:
                    if run.failed_indexes:
                        self._finish(run, "Failed", "FailedIndexes", "Job has failed indexes")
                    else:
                        self._finish(run, "Complete", "CompletionsReached", "Reached expected number of succeeded pods")
                else:
                    for index in run.pending_indexes():
                        if len(run.pods) >= run.parallelism:
                            break
                        if run.retry_at.get(index, 0) > now:
                            continue
                        self._start(run, job, index)
        self._write_status(run)

    def _account(self, run: JobRun, pod: Pod) -> None:
        """The Job controller's view of a terminated pod."""
        # as a kubelet reports it: the container's own name, and the reason beside the exit code
        containers = ((run.spec.get("template") or {}).get("spec") or {}).get("containers") or [{}]
        code, ok = pod.exit_code or 0, pod.exit_code == 0 and not pod.preempted
        self._publish(run, pod.name, pod.index, containers[0].get("name", ""), "Succeeded" if ok else "Failed",
                      {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                      "finishedAt": _now()}}, disrupted=pod.preempted)
        if ok:
            if run.indexed:
                run.succeeded.add(pod.index)
            else:
                run.succeeded.add(len(run.succeeded))
            return
        action = "Count"
        for rule in run.policy:
            if self._rule_matches(rule, pod):
                action = rule.get("action", "Count")
                break
        if action == "Ignore":
            run.ignored_failures += 1
            return
        run.failed_pods += 1
        if action == "FailJob":
            self._finish(run, "Failed", "PodFailurePolicy",
                         f"Container of pod {pod.name} failed with exit code {pod.exit_code} matching FailJob rule")
            return
        if action == "FailIndex":
            run.failed_indexes.add(pod.index)
        else:
            run.index_failures[pod.index] += 1
            if run.per_index is not None:
                if run.index_failures[pod.index] > int(run.per_index):
                    run.failed_indexes.add(pod.index)
            if run.backoff_limit is not None and run.failed_pods > int(run.backoff_limit):
                self._finish(run, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
                return
        if run.max_failed_indexes is not None and len(run.failed_indexes) > int(run.max_failed_indexes):
            self._finish(run, "Failed", "MaxFailedIndexesExceeded", "Job has exceeded the specified maximal "
                                                                     "number of failed indexes")
            return
        if pod.index not in run.failed_indexes:
            run.retry_at[pod.index] = time.monotonic() + self.retry_delay

    @staticmethod
    def _rule_matches(rule: dict[str, Any], pod: Pod) -> bool:
        on_codes = rule.get("onExitCodes")
        if on_codes:
            values = set(on_codes.get("values") or [])
            if on_codes.get("operator", "In") == "In":
                return pod.exit_code in values
            return pod.exit_code not in values and pod.exit_code != 0
        for cond in rule.get("onPodConditions") or []:
            if cond.get("type") == "DisruptionTarget" and pod.preempted and cond.get("status", "True") == "True":
                return True
        return False

    def _admission_error(self, run: JobRun, pod_spec: dict[str, Any]) -> str | None:
        """Why the API server's admission would refuse the Job's pod, or None. Emulated: the
        ServiceAccount admission plugin (a pod's ServiceAccount must exist; `default` is taken to
        exist, as the ServiceAccount controller creates it in every namespace), and the Priority and
        RuntimeClass plugins (the classes a pod names must exist; the `system-` priorities always do)."""
        account = pod_spec.get("serviceAccountName") or "default"
        if account != "default" and self.cluster.get("serviceaccounts", account, run.namespace) is None:
            return (f'pods "{run.name}-" is forbidden: error looking up service account '
                    f'{run.namespace}/{account}: serviceaccount "{account}" not found')
        # the Priority and RuntimeClass admission plugins: the classes a pod names must exist
        priority = pod_spec.get("priorityClassName")
        if priority and not priority.startswith("system-") and self.cluster.get("priorityclasses", priority) is None:
            return f'pods "{run.name}-" is forbidden: no PriorityClass with name {priority} was found'
        runtime = pod_spec.get("runtimeClassName")
        if runtime and self.cluster.get("runtimeclasses", runtime) is None:
            return f'pod rejected: RuntimeClass "{runtime}" not found'
        return None

    def _failed_create(self, run: JobRun, message: str) -> None:
        """The Job controller's Warning event for a pod it cannot create, posted once per message
        (the Job's status does not change: the pod simply never exists)."""
        if run.failed_create == message:
            return
        run.failed_create = message
        try:
            self.cluster.create({"apiVersion": "v1", "kind": "Event", "metadata": {
                "generateName": f"{run.name}.", "namespace": run.namespace},
                "involvedObject": {"apiVersion": "batch/v1", "kind": "Job", "name": run.name,
                                   "namespace": run.namespace, "uid": run.uid},
                "reason": "FailedCreate", "message": f"Error creating: {message}", "type": "Warning",
                "source": {"component": "job-controller"}, "firstTimestamp": _now(), "lastTimestamp": _now(),
                "count": 1}, run.namespace)
        except ClusterApiError:
            pass

    def _finish(self, run: JobRun, kind: str, reason: str, message: str) -> None:
        run.finished, run.finish_reason, run.finish_message = kind, reason, message
        run.completion_time = _now()
        self._delete_active(run)

    def _delete_active(self, run: JobRun) -> None:
        """Kill the Job's running pods and delete their objects, and those of pods still waiting to
        start, as the Job controller does when the Job finishes or is suspended. The pods that ended
        stay (until the Job is deleted): they are what says why."""
        for pod in list(run.pods.values()):
            pod.preempted = True
            self._kill(pod)
            self._delete_pod(run, pod.name)
        run.pods.clear()
        for index, name in list(run.waiting_pod.items()):
            self._delete_pod(run, name)
        run.waiting_pod.clear()
        run.waiting_reason.clear()

    def _write_status(self, run: JobRun) -> None:
        status: dict[str, Any] = {
            "active": len(run.pods),
            "succeeded": len(run.succeeded),
            "failed": run.failed_pods,
            "ready": len(run.pods),
            "terminating": 0,
        }
        if run.start_time:
            status["startTime"] = run.start_time
        if run.indexed:
            status["completedIndexes"] = _compress(run.succeeded)
            if run.per_index is not None or run.failed_indexes:
                status["failedIndexes"] = _compress(run.failed_indexes)
        if run.suspended is not None:   # as the Job controller writes it; it stays after a resume, False
            status["conditions"] = [{
                "type": "Suspended", "status": str(run.suspended), "reason": "JobSuspended" if run.suspended
                else "JobResumed", "message": "Job suspended" if run.suspended else "Job resumed",
                "lastProbeTime": run.suspended_at, "lastTransitionTime": run.suspended_at}]
        if run.finished:
            status["active"] = status["ready"] = 0
            if run.finished == "Complete":
                status["completionTime"] = run.completion_time
                pre = "SuccessCriteriaMet"
            else:
                pre = "FailureTarget"
            status["conditions"] = status.get("conditions", []) + [
                {"type": pre, "status": "True", "reason": run.finish_reason, "message": run.finish_message,
                 "lastProbeTime": run.completion_time, "lastTransitionTime": run.completion_time},
                {"type": run.finished, "status": "True", "reason": run.finish_reason, "message": run.finish_message,
                 "lastProbeTime": run.completion_time, "lastTransitionTime": run.completion_time},
            ]
        if status == run.last_status:
            return
        try:
            # Replace the whole status (a merge patch could not drop stale keys).
            self.cluster.patch("jobs.batch", run.name, [{"op": "add", "path": "/status", "value": status}],
                               run.namespace, "status", "application/json-patch+json")
            run.last_status = status
        except ClusterApiError as e:
            if e.code != 404:
                raise
