"""A controller lost while an evaluation Job runs is replaced by one that asks the LLM nothing it
was asked already and adopts that Job, even when the LLM would now answer otherwise: the
transcript reaches storage before a batch's Job is created, not only at checkpoints.

The real controller (`controller.run`), executor, workers, file store and a real HTTP chat
server; `FakeCluster` stands in for the Kubernetes API server and the kubelet only."""

import json
import os
from pathlib import Path

import pytest

from chat_server import ScriptedChat, default_reply
from selfpruner.cluster import controller, worker
from selfpruner.cluster.layout import Layout
from selfpruner.storage import open_store

UID = "55555555-eeee-4eee-8eee-eeeeeeeeeeee"


class DriftingChat(ScriptedChat):
    """Answers the same prompt differently each time, as a server sampling at temperature > 0
    (or one whose model changed) does."""

    def _next(self, body: dict):
        with self.lock:
            self.requests.append(body)
            n = len(self.requests)
        salted = json.loads(json.dumps(body))
        salted["messages"][-1]["content"] += f"\n(draw {n})"
        return ("reply", default_reply(salted, self.dim))


class ControllerLost(Exception):
    """The controller's pod is gone (evicted, its node lost) right after it created a Job."""


class FakeCluster:
    """The API server (Jobs kept as created, 409 on an existing name answered with that Job, as
    `Kube.create_job` does) and the kubelet (a Job's pods run in this process, one worker per
    completion index, the first time the Job is read). `lose_at(body)` says at which created Job
    the controller is lost."""

    def __init__(self, doc: dict, store, lose_at=None):
        self.doc, self.store, self.lose_at = doc, store, lose_at
        self.jobs: dict[str, dict] = {}
        self.created: list[str] = []  # every create call, adopted ones included
        self.ran: set[str] = set()
        self.patches: list[dict] = []  # every status patch, in order

    def read_prunejob(self, name):
        return self.doc

    def patch_status(self, name, status):
        self.patches.append(status)

    def event(self, prunejob, reason, message, type_="Normal"):
        pass

    def create_job(self, body: dict) -> dict:
        name = body["metadata"]["name"]
        self.created.append(name)
        self.jobs.setdefault(name, body)
        if self.lose_at is not None and self.lose_at(body):
            self.lose_at = None
            raise ControllerLost(name)
        return self.jobs[name]

    def read_job(self, name: str) -> dict | None:
        job = self.jobs.get(name)
        if job is None:
            return None
        if name not in self.ran:
            self.ran.add(name)
            self._run_pods(job)
        return {**job, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}

    def _run_pods(self, job: dict) -> None:
        container = job["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"]
               if "value" in e and e["name"] not in ("HOME", "SELFPRUNER_CACHE")}  # this test's cache
        run = worker.worker if container["command"][-1] == "worker" else worker.finalize
        for index in range(job["spec"].get("completions") or 1):
            saved = dict(os.environ)
            os.environ.update(env, JOB_COMPLETION_INDEX=str(index))
            try:
                assert run() == 0
            finally:
                os.environ.clear()
                os.environ.update(saved)


def batch_of(job: dict) -> str | None:
    """The batch of candidates an evaluation Job evaluates (None for preparation and finalize)."""
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    return None if env.get("SELFPRUNER_BATCH") in (None, "prep") else env["SELFPRUNER_BATCH"]


def test_a_lost_controller_is_replaced_without_asking_the_llm_again(tiny_job, tmp_path, monkeypatch):
    monkeypatch.delenv("SELFPRUNER_METRICS_PORT", raising=False)
    with DriftingChat(dim=6) as server:
        doc = tiny_job("durable", search={"strategy": "llm-evolution", "generations": 3, "baselines": []},
                       fitness={"screenTokens": 128},
                       llm={"provider": "openai", "model": "scripted", "baseURL": server.url,
                            "offspringPerCall": 2, "concurrency": 4},
                       evaluator={"gpusPerPod": 0, "parallelism": 1})
        doc["metadata"].update(uid=UID, namespace="default", generation=1)
        doc["spec"]["output"] = {"export": False}
        doc["spec"]["storage"] = {"uri": f"file://{tmp_path / 'store'}"}
        store, layout = open_store(doc["spec"]["storage"]["uri"]), Layout(UID)

        def second_generations_full_batch(body: dict) -> bool:
            batch = batch_of(body)
            screen = batch and any("sample" in t for t in store.get_json(layout.shard(batch, 0))["tasks"])
            return batch is not None and not screen and body["metadata"]["labels"]["selfpruner.io/generation"] == "2"

        cluster = FakeCluster(doc, store, lose_at=second_generations_full_batch)
        with pytest.raises(ControllerLost) as lost:
            controller.run(doc, cluster)
        killed_job = str(lost.value)
        # a new search shows its progress from the start, before its first checkpoint
        running = [p for p in cluster.patches if p.get("phase") == "Running"]
        assert running[0]["progress"] == f"0/{running[0]['budget']:g}" and running[0]["budgetSpent"] == 0
        patches_of_first_life = len(cluster.patches)
        asked_before = len(server.requests)
        first_life = len(cluster.created)
        checkpoint = store.get_json(layout.latest_state)
        assert checkpoint["generation"] == 2  # lost mid-generation, after the LLM answered for it
        calls_at_checkpoint = json.loads(store.get_bytes(layout.state("state.json", checkpoint["checkpoint"])))
        assert asked_before > calls_at_checkpoint["strategy"]["extra"]["llm_calls"]

        asked_on_resume = []
        original = cluster.create_job

        def create_job(body):
            if batch_of(body):
                asked_on_resume.append((body["metadata"]["name"], len(server.requests)))
            return original(body)

        cluster.create_job = create_job
        assert controller.run(doc, cluster) == 0
        asked_after = len(server.requests)
        # a resumed one keeps the progress it had reached instead of going back to 0
        resumed = next(p for p in cluster.patches[patches_of_first_life:] if p.get("phase") == "Running")
        assert "budget" in resumed and "progress" not in resumed and "budgetSpent" not in resumed
        transcript = store.get_bytes(layout.output("llm_transcript.jsonl")).decode().splitlines()

    # the screen's results were in storage already: the first Job the new controller asks for is
    # the one that was running, asked before any new LLM call
    assert asked_on_resume[0] == (killed_job, asked_before), (asked_on_resume[:2], killed_job, asked_before)
    assert cluster.created.count(killed_job) == 2  # created once, adopted once
    assert len(set(cluster.created[:first_life])) == first_life  # no Job asked twice in one life
    # every LLM call was asked exactly once over both lives
    assert asked_after == len(transcript)
    assert [json.loads(line)["call"] for line in transcript] == list(range(len(transcript)))


def test_the_pending_transcript_is_taken_only_where_it_continues_the_checkpoints(tmp_path):
    from selfpruner.cluster.pending import TRANSCRIPT, PendingTranscript

    store, layout = open_store(f"file://{tmp_path / 'store'}"), Layout(UID)

    def lines(*calls) -> str:
        return "".join(json.dumps({"call": i, "reply": r}) + "\n" for i, r in enumerate(calls))

    def resumed(checkpoint: str | None, pending: str | None) -> str | None:
        work = Path(tmp_path / "work")
        work.mkdir(exist_ok=True)
        (work / TRANSCRIPT).unlink(missing_ok=True)
        if checkpoint is not None:
            (work / TRANSCRIPT).write_text(checkpoint)
        if pending is not None:
            store.put_bytes(layout.pending_state(TRANSCRIPT), pending.encode())
        PendingTranscript(store, layout, work).restore()
        return (work / TRANSCRIPT).read_text() if (work / TRANSCRIPT).is_file() else None

    assert resumed(lines("a"), None) == lines("a")  # nothing pending
    assert resumed(lines("a"), lines("a", "b")) == lines("a", "b")  # asked since the checkpoint
    assert resumed(None, lines("a")) == lines("a")  # lost during the initial population's batch
    assert resumed(lines("a", "b"), lines("a")) == lines("a", "b")  # stale: the checkpoint is newer
    assert resumed(lines("a", "b"), lines("a", "b")) == lines("a", "b")
    assert resumed(lines("a", "b"), lines("a", "c", "d")) == lines("a", "b")  # another history: not ours to replay

    work = tmp_path / "work"
    (work / TRANSCRIPT).write_text(lines("a"))
    store.put_bytes(layout.pending_state(TRANSCRIPT), lines("a", "b").encode())
    pending = PendingTranscript(store, layout, work)
    assert pending.restore()
    written = []
    store.put_bytes = lambda key, data: written.append(data)
    pending.save()  # what storage holds already is not written again
    assert written == []
    (work / TRANSCRIPT).write_text(lines("a", "b", "e"))
    pending.save()
    assert written == [lines("a", "b", "e").encode()]
