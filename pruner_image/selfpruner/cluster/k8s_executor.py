"""Evaluations as Kubernetes Jobs: the search loop's executor inside the controller pod.

A batch of candidates becomes tasks in object storage and one Indexed Job whose pods
each evaluate a shard and write one result object per candidate. Results are keyed by
content, so after a controller restart the candidates already evaluated are read back,
a batch asked again finds its Job (named by a hash of all its tasks, done or not: a
restarted controller asking the same batch adopts the Job still running, and its pods skip
the candidates done already), and nothing is evaluated twice. That needs the restarted
controller to ask the same batch: what decided it and is not in storage yet (the LLM's replies
since the last checkpoint) is put there before the Job is created (`before_submit`). A shard
whose pods keep failing is recorded as failed evaluations, with how its pods exited (42: the
candidates cannot be evaluated; 43: the GPU failed on every try).

Time waiting for a Job counts only while it runs: not while it is suspended (by the user, or
by Kueue while it waits for quota). Each Job has its own `activeDeadlineSeconds`, which
Kubernetes measures the same way.
"""

from __future__ import annotations

import time
from collections import Counter

from ..architecture import Geometry
from ..executors.base import EvalOutcome, EvalTask
from ..errors import UserError
from . import manifests, policy, status
from .failures import Verdict
from .kube import failed_pod_exits, job_failure, job_finished, job_stuck
from .layout import Layout, batch_id, task_id


class KubernetesExecutor:
    def __init__(self, prunejob: dict, store, kube, image: str, *, poll: float = 1.0, timeout: float | None = None,
                 before_submit=None):
        """`timeout`: seconds a Job may run (suspended time not counted) before the controller gives
        up on it; by default a minute past the Jobs' own activeDeadlineSeconds. `before_submit()`
        runs before an evaluation batch's Job is created (or adopted): what decided the batch and
        is not in storage yet (the LLM's replies since the last checkpoint) goes there, so that a
        replacement controller asks the same batch and adopts the Job instead of starting another."""
        self.pj, self.store, self.kube, self.image = prunejob, store, kube, image
        self.before_submit = before_submit
        self.layout = Layout(prunejob["metadata"]["uid"])
        self.poll = poll
        self.timeout = timeout if timeout is not None else manifests.active_deadline(prunejob) + 60
        self.generation = 0
        self.geometry: Geometry | None = None
        self.prior: dict = {}
        self.memory_plan: dict | None = None  # the preparation pod's, with its GPUs

    # -- preparation: geometry, calibration statistics, prior (once per PruneJob) ------
    def prepare(self) -> None:
        if not self.store.exists(self.layout.prepared):
            job = self._run_batch("prep", [[{"prepare": True}]], wanted=[], on_result=None,
                                  ready=lambda: self.store.exists(self.layout.prepared))
            if not self.store.exists(self.layout.prepared):
                why = "the model could not be loaded or calibrated (its pod's log says why)"
                if self.store.exists(self.layout.prepare_failed):
                    why = self.store.get_json(self.layout.prepare_failed)["error"]
                raise Verdict("PrepareFailed", f"the preparation Job failed{_why(job)}: {why}")
        prepared = self.store.get_json(self.layout.prepared)
        self.geometry = Geometry(**prepared["geometry"])
        self.prior = prepared["prior"]
        self.memory_plan = prepared.get("memory_plan")

    # -- the executor interface -------------------------------------------------------
    def evaluate(self, tasks: list[EvalTask], on_result=None) -> list[EvalOutcome]:
        done = on_result or (lambda i, outcome: None)
        items = [{"rates": t.rates, "tokens": t.tokens, "text": t.text,
                  **({"sample": t.sample} if t.sample is not None else {})} for t in tasks]
        ids = [task_id(item) for item in items]
        outcomes: list[EvalOutcome | None] = [None] * len(tasks)
        finished = set(self._finished_ids())
        missing = []
        for i, tid in enumerate(ids):
            if tid in finished:
                outcomes[i] = self._outcome(tid)
                done(i, outcomes[i])
            else:
                missing.append(i)
        if missing:
            # named and sharded by the whole request, not by what is missing now: a controller that
            # restarts mid-batch asks the same request and so finds the Job that is still running
            parallel = manifests.evaluator(self.pj)["parallelism"]
            shards = _split(list(range(len(tasks))), max(1, min(parallel, len(tasks))))
            batch = batch_id(ids)
            shard_tasks = [[{**items[i], "id": ids[i]} for i in shard] for shard in shards]

            def arrived(i: int) -> None:
                outcomes[i] = self._outcome(ids[i])
                done(i, outcomes[i])

            if self.before_submit is not None:
                self.before_submit()
            job = self._run_batch(batch, shard_tasks, wanted=[(i, ids[i]) for i in missing], on_result=arrived)
            lost = [i for i in missing if outcomes[i] is None]
            if lost:
                exits = self._pod_exits(job)
                index_of = {i: index for index, shard in enumerate(shards) for i in shard}
                for i in lost:
                    outcomes[i] = EvalOutcome(None, 0, 0.0, None, f"evaluation failed after its retries{_why(job)}"
                                                                  f"{exits.get(index_of[i], '')}")
                    done(i, outcomes[i])
        return outcomes

    def finalize(self, rates, out_dir: str | None, info: dict, zero_shot_request: dict | None = None) -> dict:
        """The finalize Job writes the checkpoint into storage (`out_dir` only says whether to)
        and runs the zero-shot tasks; returns its checkpoint's URI and the scores."""
        if not self.store.exists(self.layout.finalize_done):
            self.store.put_json(self.layout.finalize_task, {"rates": rates, "info": info, "export": out_dir is not None,
                                                            "zero_shot": zero_shot_request})
            job = self._create(manifests.finalize_job(self.pj, image=self.image))
            job = self._wait(job["metadata"]["name"], lambda: self.store.exists(self.layout.finalize_done))
            if not self.store.exists(self.layout.finalize_done):
                raise Verdict("FinalizeFailed", f"the finalize Job failed{_why(job)}: no checkpoint was written "
                                                f"(its pod's log says why)")
        done = self.store.get_json(self.layout.finalize_done)
        return {"checkpoint": done.get("checkpoint"), "zero_shot": done.get("zero_shot") or {}}

    # -- internals --------------------------------------------------------------------
    def _create(self, body: dict) -> dict:
        """Create a GPU Job, suspended if the PruneJob is suspended now (the spec this
        controller started with may be older)."""
        live = self.kube.read_prunejob(self.pj["metadata"]["name"])
        if live is not None:
            body["spec"]["suspend"] = bool((live.get("spec") or {}).get("suspend"))
        try:  # the installation's policy, at every child: never only at admission
            policy.check_job(body, self.pj["spec"], *policy.from_env(), self.image)
        except UserError as e:
            raise Verdict("PolicyViolation", f"Job {body['metadata']['name']} was not created: {e}") from None
        return self.kube.create_job(body)

    def _pod_exits(self, job: dict | None) -> dict[int, str]:
        """Per completion index, '; its pods exited 43 (the GPU failed) 3 times': why a shard's pods
        failed, so that the recorded failure says so and not only the pods' logs. Worded so that it
        never reads as a device error itself (`is_device_error`): the Job's own retries are spent,
        and the candidates are recorded as failed, within maxFailedEvaluations."""
        name = ((job or {}).get("metadata") or {}).get("name")
        if not name:
            return {}
        out = {}
        for index, exits in failed_pod_exits(self.kube, name).items():
            told = Counter(f"{code} ({_EXIT_MEANING.get(code) or reason or 'failed'})" for code, reason in exits)
            out[index] = "; its pods exited " + ", ".join(f"{c} {n} time{'s' if n > 1 else ''}"
                                                         for c, n in told.items())
        return out

    def _finished_ids(self) -> list[str]:
        prefix = f"{self.layout.root}/results/"
        return [k[len(prefix):-len(".json")] for k in self.store.list(prefix) if k.endswith(".json")]

    def _outcome(self, tid: str) -> EvalOutcome:
        r = self.store.get_json(self.layout.result(tid))
        return EvalOutcome(r["fitness"], r["tokens"], r["seconds"], r.get("achieved_ratio"), r.get("error"))

    def _run_batch(self, batch: str, shard_tasks: list[list[dict]], wanted, on_result, ready=None) -> dict | None:
        """Write the shards, create (or find) the batch's Job, and hand over results as they
        arrive; returns (the Job as last read) when every wanted result is in or the Job has finished."""
        for index, tasks in enumerate(shard_tasks):
            key = self.layout.shard(batch, index)
            if not self.store.exists(key):
                self.store.put_json(key, {"tasks": tasks})
        body = manifests.evaluation_job(self.pj, generation=self.generation, shards=len(shard_tasks),
                                        image=self.image, batch=batch)
        job = self._create(body)
        pending = dict(wanted)

        def collect() -> bool:
            if pending:
                finished = set(self._finished_ids())
                for i, tid in list(pending.items()):
                    if tid in finished:
                        del pending[i]
                        on_result(i)
            return not pending

        return self._wait(job["metadata"]["name"], ready or collect)

    def _wait(self, name: str, ready) -> dict | None:
        """Until `ready()` (all results in) or the Job has finished or is gone; only time while the
        Job runs counts towards the timeout. Pods that cannot start are watched (`_watch_start`)."""
        active, last, job = 0.0, time.monotonic(), None
        watch = StartWatch(self, name)
        while active < self.timeout:
            if ready():
                watch.clear()
                return job
            job = self.kube.read_job(name)
            if job is None or job_finished(job):
                ready()
                watch.clear()
                return job
            if _running(job):
                watch.check(job)
            time.sleep(self.poll)
            now = time.monotonic()
            if _running(job):
                active += now - last
            last = now
        raise Verdict("JobTimeout", f"Job {name} ran {active:.0f} s without finishing (suspended time not counted); "
                                    f"its activeDeadlineSeconds should have ended it")


class StartWatch:
    """A GPU Job whose pods cannot start (no image, no Secret, no node, or no pod created at all: a
    quota, a LimitRange, a missing ServiceAccount) shows as the PruneJob's condition EvaluationPending
    with a warning, and after evaluator.startTimeoutSeconds of it the Job is deleted (its GPUs given
    back) and the search fails with EvaluationNotStarting. Checked every CHECK_EVERY seconds: it
    lists pods and events."""

    CHECK_EVERY = 5.0
    CONDITION = "EvaluationPending"

    def __init__(self, executor: "KubernetesExecutor", name: str):
        self.x, self.name = executor, name
        self.timeout = float(manifests.evaluator(executor.pj).get("startTimeoutSeconds") or 900)
        self.since: float | None = None
        self.reported: str | None = None
        self.next_check = 0.0

    def check(self, job: dict) -> None:
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + min(self.CHECK_EVERY, self.timeout / 4)
        stuck = job_stuck(self.x.kube, job)
        if stuck is None:
            self.clear()
            return
        reason, message = stuck
        self.since = self.since or now
        if now - self.since >= self.timeout:
            self.x.kube.delete_job(self.name)
            raise Verdict("EvaluationNotStarting", f"the pods of Job {self.name} did not start in {self.timeout:.0f} s "
                                                   f"(spec.evaluator.startTimeoutSeconds): {message}; the Job was "
                                                   f"deleted and its GPUs given back")
        if self.reported != reason + message:
            self.reported = reason + message
            self._status("True", reason, message)
            self.x.kube.event(self.x.pj, self.CONDITION, message, type_="Warning")

    def clear(self) -> None:
        if self.reported is not None:
            self._status("False", "Started", f"the pods of Job {self.name} started")
        self.since = self.reported = None

    def _status(self, value: str, reason: str, message: str) -> None:
        meta = self.x.pj["metadata"]
        self.x.kube.patch_status(meta["name"], {"conditions": [
            status.condition(self.CONDITION, value, reason, message, meta.get("generation"))]})


def _running(job: dict) -> bool:
    """Admitted and not suspended (Kueue keeps a queued Job suspended; startTime is set once it runs)."""
    return not (job.get("spec") or {}).get("suspend") and bool((job.get("status") or {}).get("startTime"))


_EXIT_MEANING = {manifests.EXIT_UNEVALUABLE: "cannot be evaluated", manifests.EXIT_DEVICE_ERROR: "the GPU failed"}


def _why(job: dict | None) -> str:
    """' (reason: message)' of a failed Job (kube.job_failure, the one reader of it), or ''."""
    failure = job_failure(job)
    return f" ({failure})" if failure else ""


def _split(items: list, n: int) -> list[list]:
    """n contiguous shards of nearly equal size."""
    k, r = divmod(len(items), n)
    out, start = [], 0
    for s in range(n):
        end = start + k + (1 if s < r else 0)
        out.append(items[start:end])
        start = end
    return [s for s in out if s]
