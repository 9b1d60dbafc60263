"""Where a PruneJob's things live in object storage, under `runs/<uid>/`.

Tasks and results are keyed by content (a hash of the candidate, fidelity, text and window
sample), so a restarted controller finds the results of evaluations it asked for before it
died, and nothing is evaluated twice.
"""

from __future__ import annotations

import hashlib
import json

STATE_FILES = ("state.json", "history.jsonl", "llm_transcript.jsonl")


def task_id(task: dict) -> str:
    """The content key of an evaluation: what decides its result, as the fitness cache
    (`History.key`) keys it. A screen on windows drawn afresh (`sample`) is another evaluation
    than the same candidate on other windows; a task on the fixed windows hashes without the
    field, so its id is the one stores written before samples existed hold."""
    content = {"rates": task["rates"], "tokens": task["tokens"], "text": task["text"]}
    if task.get("sample") is not None:
        content["sample"] = task["sample"]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]


def batch_id(task_ids: list[str]) -> str:
    return hashlib.sha256(",".join(sorted(task_ids)).encode()).hexdigest()[:10]


class Layout:
    def __init__(self, uid: str):
        self.root = f"runs/{uid}"

    @property
    def spec(self) -> str:
        return f"{self.root}/prunejob.json"

    def state(self, name: str, checkpoint: int) -> str:
        """State files of one checkpoint: never overwritten, so a controller that dies while
        uploading leaves the previous checkpoint intact (`latest_state` says which is whole)."""
        return f"{self.root}/state/{checkpoint}/{name}"

    def pending_state(self, name: str) -> str:
        """A state file as it stood when the last evaluation Job was created, newer than the last
        checkpoint's: overwritten before every batch (see `cluster/pending.py`)."""
        return f"{self.root}/state/pending/{name}"

    @property
    def latest_state(self) -> str:
        return f"{self.root}/state/latest.json"

    @property
    def prepared(self) -> str:
        return f"{self.root}/prepare/prepared.json"  # geometry, prior statistics, memory plan

    @property
    def prepare_failed(self) -> str:
        return f"{self.root}/prepare/failed.json"  # why the preparation pod could not load the model

    @property
    def calibration(self) -> str:
        return f"{self.root}/prepare/calibration"

    def shard(self, batch: str, index: int) -> str:
        return f"{self.root}/tasks/{batch}/{index}.json"

    def result(self, tid: str) -> str:
        return f"{self.root}/results/{tid}.json"

    @property
    def checkpoint(self) -> str:
        return f"{self.root}/checkpoint"

    @property
    def finalize_task(self) -> str:
        return f"{self.root}/finalize/task.json"

    @property
    def finalize_done(self) -> str:
        return f"{self.root}/finalize/done.json"

    def output(self, name: str) -> str:
        return f"{self.root}/output/{name}"
