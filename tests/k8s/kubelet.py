"""The kubelet: each pod's single container run as a local process, and its Pod object published."""

from __future__ import annotations

import base64
import os
import pathlib
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from .apiserver import REPO, _now
from .client import Cluster, ClusterApiError
from .jobcontroller import JobController, JobRun, Pod, _job_condition

class Kubelet(JobController):
    """Plays kubelet + Job controller for batch/v1 Jobs in a Cluster, running each pod's single
    container as a local process (see module doc and tests/README.md for what is and isn't emulated).

    command_map(argv) -> argv translates an image command into a local one.
    """

    def __init__(self, cluster: Cluster, *, command_map: Callable[[list[str]], list[str]] | None = None,
                 logs_dir: str | os.PathLike[str] | None = None, poll_interval: float = 0.05,
                 retry_delay: float = 0.0, cwd: str | os.PathLike[str] | None = None,
                 extra_env: Mapping[str, str] | None = None, override_env: Mapping[str, str] | None = None,
                 service_account_tokens: bool = False):
        self.cluster = cluster
        # True: each pod talks to the API server as its ServiceAccount (the token a real pod mounts),
        # so RBAC limits it; False: as the administrator, as the tests' own helpers do
        self.service_account_tokens = service_account_tokens
        self.override_env = dict(override_env or {})  # applied after the container's own env
        self.command_map = command_map or (lambda argv: argv)
        self.logs_dir = pathlib.Path(logs_dir or cluster.workdir / "pod-logs")
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.poll_interval = poll_interval
        self.retry_delay = retry_delay
        self.cwd = str(cwd or REPO)
        self.extra_env = dict(extra_env or {})
        self.jobs: dict[str, JobRun] = {}                # by uid
        self.unpullable: set[str] = set()                # images whose pull fails (ErrImagePull)
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    def __enter__(self) -> "Kubelet":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> "Kubelet":
        self._thread = threading.Thread(target=self._loop, name="fake-kubelet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        with self.lock:
            for run in self.jobs.values():
                for pod in list(run.pods.values()):
                    self._kill(pod)

    def _run_named(self, job_name: str, namespace: str | None) -> JobRun | None:
        ns = namespace or self.cluster.namespace
        with self.lock:
            runs = [r for r in self.jobs.values() if r.name == job_name and r.namespace == ns]
        return runs[-1] if runs else None

    def processes(self, job_name: str, namespace: str | None = None) -> dict[int, int]:
        """{index: pid} of the Job's running pods."""
        run = self._run_named(job_name, namespace)
        if run is None:
            return {}
        with self.lock:
            return {i: p.proc.pid for i, p in run.pods.items() if p.proc is not None and p.proc.poll() is None}

    def logs(self, job_name: str, namespace: str | None = None) -> list[pathlib.Path]:
        """Log files of all the Job's pods so far (one per pod, in start order)."""
        run = self._run_named(job_name, namespace)
        return [p.log_path for p in (run.all_pods if run else []) if p.log_path is not None]

    def all_logs(self) -> list[pathlib.Path]:
        return sorted(self.logs_dir.glob("*.log"))

    def dump_logs(self, limit: int = 4000) -> str:
        chunks = []
        for path in self.all_logs():
            text = path.read_text(errors="replace")
            chunks.append(f"----- {path.name} -----\n{text[-limit:]}")
        return "\n".join(chunks)

    def preempt(self, job_name: str, index: int, namespace: str | None = None) -> int:
        """Kill that pod's process as a disruption (pod condition DisruptionTarget=True). Returns the pid."""
        run = self._run_named(job_name, namespace)
        if run is None:
            raise KeyError(f"no job {job_name!r}")
        with self.lock:
            pod = run.pods.get(index)
            if pod is None or pod.proc is None:
                raise KeyError(f"job {job_name!r} has no running pod for index {index}")
            pod.preempted = True
            pid = pod.proc.pid
            self._kill(pod)
        return pid

    def wait_finished(self, job_name: str, namespace: str | None = None, timeout: float = 20) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            job = self.cluster.get("jobs", job_name, namespace)
            if job and (_job_condition(job, "Complete") or _job_condition(job, "Failed")):
                return job
            return None
        try:
            return self.cluster.wait_for(finished, timeout, message=f"job {job_name} to finish")
        except TimeoutError:
            raise TimeoutError(f"job {job_name} did not finish in {timeout}s; pod logs:\n{self.dump_logs()}") from None

    def _publish(self, run: JobRun, name: str, index: int, container: str, phase: str,
                 state: dict[str, Any], disrupted: bool = False) -> None:
        """The Pod object a kubelet reports (what `kubectl get pods` and the operator read); owned by
        its Job, so deleting the Job deletes it. A pod killed as a disruption carries the condition
        the scheduler adds before it preempts (DisruptionTarget=True), which is how a reader tells a
        preemption from a failure the Job counted."""
        conditions = [{"type": "PodScheduled", "status": "True"}]
        if disrupted:
            conditions.append({"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                               "message": "Kube-scheduler: preempting to accommodate a higher priority pod"})
        status = {"phase": phase, "conditions": conditions,
                  "containerStatuses": [{"name": container, "ready": phase == "Running", "restartCount": 0,
                                         "image": "", "imageID": "", "state": state}]}
        try:
            if self.cluster.get("pods", name, run.namespace) is None:
                # the template's labels, as the Job controller copies them (the generated selector's among them)
                labels = dict(((run.spec.get("template") or {}).get("metadata") or {}).get("labels") or {})
                labels.setdefault("job-name", run.name)
                labels.setdefault("controller-uid", run.uid)
                if run.indexed:
                    labels["batch.kubernetes.io/job-completion-index"] = str(index)
                self.cluster.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
                    "name": name, "namespace": run.namespace, "labels": labels,
                    "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": run.name, "uid": run.uid,
                                         "controller": True, "blockOwnerDeletion": True}]},
                    "spec": {"containers": [{"name": container, "image": ""}], "nodeName": "emulated-node"}},
                    run.namespace)
            self.cluster.patch("pods", name, {"status": status}, run.namespace, "status")
        except ClusterApiError as e:
            if e.code not in (404, 409):
                raise

    def _delete_pod(self, run: JobRun, name: str) -> None:
        """Remove a Pod object from the API, as the Job controller does with the active pods of a Job
        that is suspended or has finished."""
        self.cluster.delete("pods", name, run.namespace)

    def _wait_pod(self, run: JobRun, index: int, container: str, reason: str, message: str) -> None:
        name = run.waiting_pod.setdefault(index, f"{run.name}-{index}-{uuid.uuid4().hex[:5]}")
        if run.waiting_reason.get(index) != reason + message:
            self._publish(run, name, index, container, "Pending", {"waiting": {"reason": reason, "message": message}})
        run.waiting_reason[index] = reason + message
        run.retry_at[index] = time.monotonic() + 0.2

    def _start(self, run: JobRun, job: dict[str, Any], index: int) -> None:
        template = ((job.get("spec") or {}).get("template") or {})
        pod_spec = template.get("spec") or {}
        containers = pod_spec.get("containers") or []
        if len(containers) != 1:
            self._finish(run, "Failed", "Unsupported", "the emulated kubelet runs exactly one container per pod")
            return
        container = containers[0]
        refused = self._admission_error(run, pod_spec)
        if refused:                          # no Pod object at all: the Job controller posts FailedCreate
            self._failed_create(run, refused)
            run.retry_at[index] = time.monotonic() + 0.2
            return
        pod = Pod(run, index, run.attempts[index])
        if container.get("image") in self.unpullable:   # ErrImagePull: keep waiting, as a kubelet does
            self._wait_pod(run, index, container.get("name", ""), "ErrImagePull",
                           f'failed to pull image "{container.get("image")}": not found')
            return
        try:
            env = self._env(run, pod, container, template)
        except LookupError as e:             # CreateContainerConfigError: keep waiting, as a kubelet does
            self._wait_pod(run, index, container.get("name", ""), "CreateContainerConfigError", str(e))
            return
        run.waiting_reason.pop(index, None)
        if index in run.waiting_pod:
            pod.name = run.waiting_pod.pop(index)
        argv = list(container.get("command") or []) + list(container.get("args") or [])
        argv = [self._expand(a, env) for a in argv]
        argv = list(self.command_map(argv))
        run.attempts[index] += 1
        pod.log_path = self.logs_dir / f"{run.namespace}_{pod.name}.log"
        cwd = container.get("workingDir")
        cwd = cwd if cwd and os.path.isdir(cwd) else self.cwd
        with open(pod.log_path, "wb") as log:
            log.write(f"# pod {pod.name} index={index} attempt={pod.attempt} argv={argv!r}\n".encode())
            log.flush()
            try:
                pod.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, cwd=cwd, start_new_session=True)
            except OSError as e:             # like a container that cannot start: exit code 127/128
                log.write(f"# cannot start: {e}\n".encode())
                pod.exit_code = 127
                run.all_pods.append(pod)
                self._account(run, pod)
                return
        run.pods[index] = pod
        run.all_pods.append(pod)
        self._publish(run, pod.name, index, container.get("name", ""), "Running",
                      {"running": {"startedAt": _now()}})

    @staticmethod
    def _expand(arg: str, env: Mapping[str, str]) -> str:
        """Kubernetes' $(VAR) expansion in command/args."""
        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)

    def _secret(self, run: JobRun, kind: str, name: str, optional: bool) -> dict[str, str] | None:
        obj = self.cluster.get(kind, name, run.namespace)
        if obj is None:
            if optional:
                return None
            raise LookupError(f'{kind} "{name}" not found')
        if kind == "secrets":
            return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
        return dict(obj.get("data") or {})

    def _env(self, run: JobRun, pod: Pod, container: dict[str, Any], template: dict[str, Any]) -> dict[str, str]:
        spec = template.get("spec") or {}
        account = spec.get("serviceAccountName") or "default"
        mount = spec.get("automountServiceAccountToken")
        if mount is None and self.service_account_tokens:   # the pod's setting wins, else its ServiceAccount's
            mount = (self.cluster.get("serviceaccounts", account, run.namespace) or {}).get("automountServiceAccountToken")
        # automountServiceAccountToken: false leaves the pod no token: anonymous, granted nothing
        env = self.cluster.env_as(run.namespace, None if mount is False else account) \
            if self.service_account_tokens else self.cluster.env
        env.update(self.extra_env)
        env["HOSTNAME"] = pod.name
        env["PYTHONUNBUFFERED"] = "1"
        if run.indexed:
            env["JOB_COMPLETION_INDEX"] = str(pod.index)
        for src in container.get("envFrom") or []:
            prefix = src.get("prefix", "")
            for kind, key in (("secrets", "secretRef"), ("configmaps", "configMapRef")):
                if key in src:
                    ref = src[key]
                    data = self._secret(run, kind, ref["name"], bool(ref.get("optional")))
                    for k, v in (data or {}).items():
                        env[prefix + k] = v
        fields = {
            "metadata.name": pod.name, "metadata.namespace": run.namespace, "metadata.uid": str(uuid.uuid4()),
            "spec.nodeName": "emulated-node", "spec.serviceAccountName": "default",
            "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1",
        }
        annotations = dict((template.get("metadata") or {}).get("annotations") or {})
        labels = dict((template.get("metadata") or {}).get("labels") or {})
        labels.setdefault("job-name", run.name)
        if run.indexed:
            annotations["batch.kubernetes.io/job-completion-index"] = str(pod.index)
            labels["batch.kubernetes.io/job-completion-index"] = str(pod.index)
        for item in container.get("env") or []:
            name = item["name"]
            if "value" in item:
                env[name] = self._expand(str(item["value"]), env)
                continue
            ref = item.get("valueFrom") or {}
            if "secretKeyRef" in ref or "configMapKeyRef" in ref:
                kind, sel = ("secrets", ref["secretKeyRef"]) if "secretKeyRef" in ref else ("configmaps", ref["configMapKeyRef"])
                data = self._secret(run, kind, sel["name"], bool(sel.get("optional")))
                if data is None or sel["key"] not in data:
                    if sel.get("optional"):
                        continue
                    raise LookupError(f'couldn\'t find key {sel["key"]} in {kind} {sel["name"]}')
                env[name] = data[sel["key"]]
            elif "fieldRef" in ref:
                path = ref["fieldRef"]["fieldPath"]
                m = re.match(r"metadata\.(labels|annotations)\['(.+)'\]", path)
                if m:
                    env[name] = (labels if m.group(1) == "labels" else annotations).get(m.group(2), "")
                else:
                    env[name] = fields.get(path, "")
            else:
                env[name] = ""
        env.update(self.override_env)
        return env

    @staticmethod
    def _kill(pod: Pod) -> None:
        if pod.proc is None or pod.proc.poll() is not None:
            return
        try:
            os.killpg(pod.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                pod.proc.kill()
            except ProcessLookupError:
                pass
        try:
            pod.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
