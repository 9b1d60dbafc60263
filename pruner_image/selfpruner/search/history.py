"""Every evaluation, one JSON line, written before the search moves on: the record a
person reads, and the fitness cache — keyed by (candidate, fidelity, text, sample of windows) —
that makes sure nothing is evaluated twice, across restarts too. A screen's windows are drawn
afresh (`sample`, the seed `evaluate.select_windows` draws them with): the entry records it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import DeviceFailed, is_device_error
from ..executors.base import EvalOutcome, EvalTask
from .space import SearchSpace
from .strategy import Request, Result


def read_jsonl(path: str | Path) -> list[dict]:
    """The entries of a JSON-lines file that is appended to while others read it: none when it
    does not exist yet, and a torn last line (a crash mid-write) left out."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class History:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: list[dict] = []
        self.cache: dict[tuple, dict] = {}
        for e in read_jsonl(self.path):
            self._remember(e)

    @staticmethod
    def key(rates, tokens: int, text: str, sample: int | None = None) -> tuple:
        return (json.dumps(rates, sort_keys=True), tokens, text, sample)

    def _remember(self, e: dict) -> None:
        self.entries.append(e)
        if e.get("fitness") is not None:
            self.cache[self.key(e["rates"], e["tokens_budget"], e["text"], e.get("sample"))] = e

    def lookup(self, rates, tokens: int, text: str, sample: int | None = None) -> dict | None:
        return self.cache.get(self.key(rates, tokens, text, sample))

    def append(self, e: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(e) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._remember(e)

    def totals(self) -> dict:
        """Cost of everything evaluated, and of the search alone (without the report's
        dense, baseline and held-out evaluations)."""
        done = [e for e in self.entries if e.get("fitness") is not None or e.get("error")]
        search = [e for e in done if not str(e.get("origin", "")).startswith("report:")]
        return {
            "evaluations": len(done),
            "failed_evaluations": sum(1 for e in done if e.get("error")),
            "tokens_evaluated": sum(e.get("tokens", 0) for e in done),
            "device_seconds": round(sum(e.get("seconds", 0.0) for e in done), 3),
            "search_evaluations": len(search),
            "search_tokens_evaluated": sum(e.get("tokens", 0) for e in search),
            "search_device_seconds": round(sum(e.get("seconds", 0.0) for e in search), 3),
        }


class Evaluator:
    """Runs requests through the cache, then the executor; records every new evaluation."""

    def __init__(self, executor, history: History, space: SearchSpace):
        self.executor, self.history, self.space = executor, history, space

    def run(self, items: list[tuple[object, int, str, str, int | None]],
            generation: int) -> list[tuple[dict | None, bool]]:
        """items: (rates json, tokens, text, origin, sample) -> [(entry, cached)] in order."""
        out: list = [None] * len(items)
        todo = []
        for i, (rates, tokens, text, origin, sample) in enumerate(items):
            hit = self.history.lookup(rates, tokens, text, sample)
            if hit is not None:
                out[i] = (hit, True)
            else:
                todo.append(i)
        # the same new candidate twice in one batch is evaluated once
        unique: dict[tuple, list[int]] = {}
        for i in todo:
            rates, tokens, text, _, sample = items[i]
            unique.setdefault(History.key(rates, tokens, text, sample), []).append(i)
        firsts = [idx[0] for idx in unique.values()]
        device_failures: list[str] = []

        def record(k: int, outcome: EvalOutcome) -> None:
            if outcome.error and is_device_error(outcome.error):
                device_failures.append(outcome.error)  # the device's failure, not the candidate's
                return
            i = firsts[k]
            rates, tokens, text, origin, sample = items[i]
            entry = {"n": len(self.history.entries), "generation": generation, "origin": origin, "text": text,
                     **({"sample": sample} if sample is not None else {}),
                     "rates": rates, "tokens_budget": tokens, "tokens": outcome.tokens, "fitness": outcome.fitness,
                     "seconds": round(outcome.seconds, 4), "achieved_ratio": outcome.achieved_ratio,
                     "error": outcome.error, "time": round(time.time(), 3)}
            self.history.append(entry)
            for j in unique[History.key(rates, tokens, text, sample)]:
                out[j] = (entry, j != i)

        if firsts:
            self.executor.evaluate([EvalTask(rates=items[i][0], tokens=items[i][1], text=items[i][2],
                                            sample=items[i][4]) for i in firsts], on_result=record)
        if device_failures:
            # recorded, they would count as the candidates' failures and be checkpointed with the
            # generation; stopping before `tell` leaves the last checkpoint to resume from
            raise DeviceFailed(
                f"the device failed on {len(device_failures)} of {len(firsts)} evaluation(s) of generation "
                f"{generation}, nothing was recorded for them (first: {DeviceFailed.describe(device_failures[0])}); "
                "free the device (another process may hold its memory) and run the same command again: "
                "the search resumes from its last finished generation")
        return out

    def evaluate(self, requests: list[Request], generation: int) -> list[Result]:
        items = [(self.space.to_rates(r.units).to_json(), r.tokens, "fitness", r.origin, r.sample) for r in requests]
        results = []
        for entry, cached in self.run(items, generation):
            results.append(Result(fitness=entry["fitness"], tokens=entry["tokens_budget"], seconds=entry["seconds"],
                                  cached=cached, error=entry.get("error")))
        return results
