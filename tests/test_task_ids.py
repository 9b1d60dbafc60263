"""Results in storage are keyed by everything that decides them: a candidate screened again on
fresh windows (staged selection, EvoPress) is evaluated again on a cluster, as it is locally."""

import hashlib
import json

from selfpruner.cluster.k8s_executor import KubernetesExecutor
from selfpruner.cluster.layout import Layout, task_id
from selfpruner.executors.base import EvalTask
from selfpruner.storage import open_store

PJ = {"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob",
      "metadata": {"name": "ids", "namespace": "default", "uid": "44444444-dddd-4ddd-8ddd-dddddddddddd"},
      "spec": {"model": {"source": "s3://models/m"}, "target": {"ratio": 0.3}, "storage": {"uri": "file:///unused"},
               "calibration": {"text": "s3://texts/c.txt"},
               "fitness": {"text": "s3://texts/f.txt", "heldOutText": "s3://texts/h.txt"},
               "search": {"strategy": "genetic"}, "evaluator": {"parallelism": 1}}}


def test_task_ids_tell_window_samples_apart_and_keep_sampleless_ids():
    task = {"rates": [0.2, 0.4], "tokens": 256, "text": "fitness"}
    assert task_id({**task, "sample": 1}) != task_id({**task, "sample": 2})
    assert task_id({**task, "sample": 1}) != task_id(task)
    # a task without windows of its own keeps the id stores written before samples were hashed hold
    before = hashlib.sha256(json.dumps(task, sort_keys=True).encode()).hexdigest()[:20]
    assert task_id(task) == task_id({**task, "sample": None}) == before


class FakeApiServer:
    """Stands in for the Kubernetes API server only: it keeps the Jobs it is given and reports
    each Complete. What the Job's pods would have done (a result object per task, with a fitness
    that depends on the task's windows) is written when the Job is created."""

    def __init__(self, store, layout: Layout):
        self.store, self.layout = store, layout
        self.jobs: dict[str, dict] = {}

    def read_prunejob(self, name):
        return None

    def create_job(self, body: dict) -> dict:
        name = body["metadata"]["name"]
        if name not in self.jobs:
            self.jobs[name] = body
            self._pods(body)
        return self.jobs[name]

    def read_job(self, name: str) -> dict | None:
        job = self.jobs.get(name)
        return job and {**job, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}

    def _pods(self, body: dict) -> None:
        env = {e["name"]: e.get("value") for e in body["spec"]["template"]["spec"]["containers"][0]["env"]}
        for index in range(body["spec"]["completions"]):
            for t in self.store.get_json(self.layout.shard(env["SELFPRUNER_BATCH"], index))["tasks"]:
                self.store.put_json(self.layout.result(t["id"]), {
                    "fitness": 10.0 + (t.get("sample") or 0), "tokens": t["tokens"], "seconds": 0.1,
                    "achieved_ratio": 0.3, "error": None})


def test_a_task_on_fresh_windows_is_not_answered_with_the_old_windows_result(tmp_path):
    store = open_store(f"file://{tmp_path / 'store'}")
    kube = FakeApiServer(store, Layout(PJ["metadata"]["uid"]))
    executor = KubernetesExecutor(PJ, store, kube, "img", poll=0.01, timeout=5)
    rates = [0.2, 0.4]
    first = executor.evaluate([EvalTask(rates=rates, tokens=256, text="fitness", sample=1)])
    again = executor.evaluate([EvalTask(rates=rates, tokens=256, text="fitness", sample=2)])
    assert first[0].fitness == 11.0
    assert again[0].fitness == 12.0, "the result of other windows was returned"
    assert len(kube.jobs) == 2
    # the same windows again: answered from storage, no Job
    assert executor.evaluate([EvalTask(rates=rates, tokens=256, text="fitness", sample=1)])[0].fitness == 11.0
    assert len(kube.jobs) == 2
