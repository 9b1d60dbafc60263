"""The LLM transcript in object storage between checkpoints.

An evaluation Job is named by a hash of its batch's tasks, and with `llm-evolution` the tasks
come from the LLM's replies. Checkpoints copy the transcript once per generation; a controller
lost after the LLM answered and before the next checkpoint would be replaced by one that asks
the LLM again, gets other replies (sampling at temperature > 0, a server that changed), asks
another batch and starts a second GPU Job beside the one still running. So the transcript goes
to storage before every batch's Job is created, and a replacement controller resumes with it:
it replays the same replies, asks the same batch and adopts the running Job.

Nothing else needs to travel: the rest of what decides a batch is the checkpoint (population,
random generator, counters) and evaluation results, which are in storage by content already
(the history a replacement lacks is rebuilt from them when it asks the earlier batches again).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from ..search.llm_clients import continues, read_calls
from ..storage import ObjectNotFound
from .layout import Layout

TRANSCRIPT = "llm_transcript.jsonl"


class PendingTranscript:
    def __init__(self, store, layout: Layout, work: Path):
        self.store, self.key, self.path = store, layout.pending_state(TRANSCRIPT), Path(work) / TRANSCRIPT
        self._stored: str | None = None  # digest of the transcript storage holds under `key`

    def restore(self) -> bool:
        """Take the pending transcript in place of the checkpoint's (already in `work`, or none)
        when it continues it; a stale one (the checkpoint is as new or newer) is left alone."""
        try:
            pending = self.store.get_bytes(self.key)
        except ObjectNotFound:
            return False
        self._stored = _digest(pending)
        checkpoint = self.path.read_text() if self.path.is_file() else ""
        calls = read_calls(pending.decode())
        if not continues(calls, read_calls(checkpoint)):
            return False
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(pending)
        os.replace(tmp, self.path)
        print(f"selfpruner: resuming with the LLM transcript of the last evaluation Job ({len(calls)} calls)",
              file=sys.stderr, flush=True)
        return True

    def save(self) -> None:
        """Before a batch's Job is created: the transcript to storage, if it changed since."""
        if not self.path.is_file():
            return  # a search without an LLM
        data = self.path.read_bytes()
        digest = _digest(data)
        if digest != self._stored:
            self.store.put_bytes(self.key, data)
            self._stored = digest


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
