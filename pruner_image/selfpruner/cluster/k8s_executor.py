"""Evaluations as Kubernetes Jobs: the search loop's executor inside the controller pod.

A batch of candidates becomes tasks in object storage and one Indexed Job whose pods
each evaluate a shard and write one result object per candidate. Results are keyed by
content, so after a controller restart the candidates already evaluated are read back,
a batch asked again finds its Job (named by a hash of its tasks), and nothing is
evaluated twice. A shard whose pods keep failing is recorded as failed evaluations.
"""

from __future__ import annotations

import time

from ..architecture import Geometry
from ..errors import UserError
from ..executors.base import EvalOutcome, EvalTask
from . import manifests
from .kube import job_finished
from .layout import Layout, batch_id, task_id


class KubernetesExecutor:
    def __init__(self, prunejob: dict, store, kube, image: str, *, poll: float = 1.0, timeout: float = 24 * 3600):
        self.pj, self.store, self.kube, self.image = prunejob, store, kube, image
        self.layout = Layout(prunejob["metadata"]["uid"])
        self.poll, self.timeout = poll, timeout
        self.generation = 0
        self.geometry: Geometry | None = None
        self.prior: dict = {}

    # -- preparation: geometry, calibration statistics, prior (once per PruneJob) ------
    def prepare(self) -> None:
        if not self.store.exists(self.layout.prepared):
            self._run_batch("prep", [[{"prepare": True}]], wanted=[], on_result=None,
                            ready=lambda: self.store.exists(self.layout.prepared))
            if not self.store.exists(self.layout.prepared):
                raise UserError("the preparation Job failed: the model could not be loaded or calibrated; "
                                "see the evaluator pod's log")
        prepared = self.store.get_json(self.layout.prepared)
        self.geometry = Geometry(**prepared["geometry"])
        self.prior = prepared["prior"]

    # -- the executor interface -------------------------------------------------------
    def evaluate(self, tasks: list[EvalTask], on_result=None) -> list[EvalOutcome]:
        done = on_result or (lambda i, outcome: None)
        items = [{"rates": t.rates, "tokens": t.tokens, "text": t.text} for t in tasks]
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
            parallel = (self.pj["spec"].get("evaluator") or {}).get("parallelism", 1)
            shards = _split([i for i in missing], max(1, min(parallel, len(missing))))
            batch = batch_id([ids[i] for i in missing])
            shard_tasks = [[{**items[i], "id": ids[i]} for i in shard] for shard in shards]

            def arrived(i: int) -> None:
                outcomes[i] = self._outcome(ids[i])
                done(i, outcomes[i])

            self._run_batch(batch, shard_tasks, wanted=[(i, ids[i]) for i in missing], on_result=arrived)
            for i in missing:
                if outcomes[i] is None:
                    outcomes[i] = EvalOutcome(None, 0, 0.0, None, "evaluation failed after its retries")
                    done(i, outcomes[i])
        return outcomes

    def export(self, rates, out_dir: str, info: dict) -> str:
        """The finalize Job writes the checkpoint into storage; returns its URI."""
        if not self.store.exists(self.layout.finalize_done):
            self.store.put_json(self.layout.finalize_task, {"rates": rates, "info": info})
            job = self._create(manifests.finalize_job(self.pj, image=self.image))
            self._wait(job["metadata"]["name"], lambda: self.store.exists(self.layout.finalize_done))
            if not self.store.exists(self.layout.finalize_done):
                raise UserError("the finalize Job failed: no checkpoint was written; see its pod's log")
        return self.store.get_json(self.layout.finalize_done)["checkpoint"]

    # -- internals --------------------------------------------------------------------
    def _create(self, body: dict) -> dict:
        """Create a GPU Job, suspended if the PruneJob is suspended now (the spec this
        controller started with may be older)."""
        live = self.kube.read_prunejob(self.pj["metadata"]["name"])
        if live is not None:
            body["spec"]["suspend"] = bool((live.get("spec") or {}).get("suspend"))
        return self.kube.create_job(body)

    def _finished_ids(self) -> list[str]:
        prefix = f"{self.layout.root}/results/"
        return [k[len(prefix):-len(".json")] for k in self.store.list(prefix) if k.endswith(".json")]

    def _outcome(self, tid: str) -> EvalOutcome:
        r = self.store.get_json(self.layout.result(tid))
        return EvalOutcome(r["fitness"], r["tokens"], r["seconds"], r.get("achieved_ratio"), r.get("error"))

    def _run_batch(self, batch: str, shard_tasks: list[list[dict]], wanted, on_result, ready=None) -> None:
        """Write the shards, create (or find) the batch's Job, and hand over results as they
        arrive; returns when every wanted result is in or the Job has finished."""
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

        self._wait(job["metadata"]["name"], ready or collect)

    def _wait(self, name: str, ready) -> None:
        """Until `ready()` (all results in) or the Job has finished or is gone."""
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if ready():
                return
            job = self.kube.read_job(name)
            if job is None or job_finished(job):
                ready()
                return
            time.sleep(self.poll)
        raise UserError(f"Job {name} did not finish within {self.timeout:.0f} s")


def _split(items: list, n: int) -> list[list]:
    """n contiguous shards of nearly equal size."""
    k, r = divmod(len(items), n)
    out, start = [], 0
    for s in range(n):
        end = start + k + (1 if s < r else 0)
        out.append(items[start:end])
        start = end
    return [s for s in out if s]
