"""Operators share each generation's offspring by their measured success (search/allocation.py):
the split itself, and llm-evolution against endpoints that answer valid but harmful replies or
copies of the parents, over a real HTTP chat server (tests/chat_server.py) and the tiny model."""

from __future__ import annotations

import hashlib
import json
import random
import re

import pytest

from chat_server import ScriptedChat
from selfpruner import spec as spec_mod
from selfpruner.search import runner
from selfpruner.search.allocation import (CROSSOVER, LLM_CROSSOVER, LLM_SELECTION, TOURNAMENT, Allocation,
                                          split)
from selfpruner.search.report import shares_line, summary_table

DIM = 6


def test_the_split_keeps_a_floor_and_follows_the_weights():
    assert split(10, [1.0, 1.0]) == [5, 5]
    assert split(10, [0.0, 1.0]) == [1, 9]  # the floor: every arm keeps being tried
    assert split(10, [3.0, 1.0]) == [7, 3]
    assert split(3, [1.0, 1.0]) == [2, 1]  # ties to the first arm
    assert split(1, [0.0, 1.0]) == [0, 1]  # too few slots for a floor
    assert split(0, [1.0, 1.0]) == [0, 0]
    assert all(sum(split(n, [0.3, 0.9])) == n for n in range(30))


def test_shares_follow_success_and_forget_slowly():
    alloc = Allocation()
    assert alloc.shares("crossover", 10) == {LLM_CROSSOVER: 5, CROSSOVER: 5}  # nothing known: even
    for _ in range(3):  # the LLM's offspring never enter, the classical ones always do
        for _ in range(5):
            alloc.credit((LLM_CROSSOVER, LLM_SELECTION), False)
            alloc.credit((CROSSOVER,), True)
        alloc.end_generation()
    assert alloc.shares("crossover", 10) == {LLM_CROSSOVER: 1, CROSSOVER: 9}
    assert alloc.shares("selection", 10)[LLM_SELECTION] < 5  # only the LLM offspring's parents: LLM selection lost too
    assert alloc.shares("selection", 10)[TOURNAMENT] == 10 - alloc.shares("selection", 10)[LLM_SELECTION]
    for _ in range(6):  # then the LLM gets good: its share comes back
        for _ in range(5):
            alloc.credit((LLM_CROSSOVER,), True)
            alloc.credit((CROSSOVER,), False)
        alloc.end_generation()
    assert alloc.shares("crossover", 10)[LLM_CROSSOVER] >= 8
    restored = Allocation()
    restored.load(json.loads(json.dumps(alloc.state())))
    assert restored.shares("crossover", 10) == alloc.shares("crossover", 10)  # a resumed search allocates alike
    assert Allocation(adaptive=False).shares("mutation", 10) == {"llm-mutation": 10, "mutation": 0}  # the paper's


def parents_in(prompt: str) -> list[list[int]]:
    """The parents listed in an offspring prompt ("1. [..]" or "1. A = [..]; B = [..]")."""
    section = prompt.split("below")[-1]
    return [json.loads(m) for m in re.findall(r"^\d+\. (?:A = )?(\[[\d, ]+\])", section, flags=re.MULTILINE)]


class HostileChat(ScriptedChat):
    """Replies valid under their schema and deliberately bad: each candidate puts all its pruning on
    a few blocks at the maximum rate, and the selection picks the worst candidates; or, with
    `copies`, every offspring is a copy of its (first) parent."""

    def __init__(self, copies: bool = False, **kw):
        super().__init__(dim=DIM, **kw)
        self.copies = copies

    def _next(self, body: dict):
        with self.lock:
            self.requests.append(body)
        prompt = "\n".join(m["content"] for m in body["messages"] if m["role"] == "user")
        # drawn from the conversation without the model's path, which is a temporary folder that differs
        # from run to run: the same search gets the same replies on every machine
        conversation = re.sub(r"language model \([^)]*\)", "language model", json.dumps(body["messages"]))
        rng = random.Random(hashlib.sha256(conversation.encode()).hexdigest())
        schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema") or {}
        if "Choose the parents" in prompt:
            size = int(re.search(r"numbered 1 to (\d+)", prompt).group(1))
            pairs = int(re.search(r"(\d+) pairs", prompt).group(1))
            singles = int(re.search(r"and (\d+) candidates to mutate", prompt).group(1))
            return ("reply", json.dumps({"crossover": [[size, size - 1]] * pairs, "mutation": [size] * singles}))
        count = schema["properties"]["candidates"]["minItems"]
        hi = schema["properties"]["candidates"]["items"]["items"]["maximum"]
        parents = parents_in(prompt)
        if self.copies and parents:
            return ("reply", json.dumps({"candidates": parents[:count]}))
        total = round(0.3 * 100) * DIM
        candidates = []
        for _ in range(count):
            units = [0] * DIM
            left = total
            for i in rng.sample(range(DIM), DIM):
                units[i] = min(hi, left)
                left -= units[i]
            candidates.append(units)
        return ("reply", json.dumps({"candidates": candidates}))


def search(tiny_job, name, strategy="llm-evolution", url=None, **llm):
    # the endpoint is a local server: a long timeout only keeps a loaded machine from losing a call
    doc = tiny_job(name, search={"strategy": strategy, "population": 8, "generations": 6, "crossovers": 4,
                                 "mutations": 4, "seed": 1},
                   llm={"provider": "openai", "model": "hostile", "baseURL": url or "http://unused/v1",
                        "timeoutSeconds": 60, "maxRetries": 1, **llm})
    return runner.run(spec_mod.parse(doc), progress=False)


def llm_share(generation: dict) -> float:
    shares = generation["shares"]
    llm = shares.get("llm-crossover", 0) + shares.get("llm-mutation", 0)
    return llm / (llm + shares.get("crossover", 0) + shares.get("mutation", 0))


@pytest.mark.parametrize("copies", [False, True], ids=["harmful", "copies"])
def test_a_bad_endpoint_cannot_sink_the_search(tiny_job, copies):
    genetic = search(tiny_job, f"genetic-{copies}".lower(), strategy="genetic")
    with HostileChat(copies=copies) as server:
        adaptive = search(tiny_job, f"adaptive-{copies}".lower(), url=server.url)
    shares = [llm_share(g) for g in adaptive["generations"] if "shares" in g]
    assert len(shares) == 6 and shares[0] == 0.5, shares  # even at first, then by success
    assert shares[-1] < shares[0] and shares[-1] >= 0.25, shares  # the LLM loses its share, down to the floor
    # the search ends where genetic does, within a few percent, at the same budget
    assert adaptive["cost"]["evaluations"] <= genetic["cost"]["evaluations"] + 2
    assert adaptive["best"]["fitness"] <= 1.05 * genetic["best"]["fitness"], (adaptive["best"], genetic["best"])
    llm = adaptive["cost"]["llm"]
    if copies:  # every copy is a repeat: asked again once, then replaced, never evaluated twice
        assert llm["offspring_duplicates"] > 0 and llm["offspring_duplicates_kept"] > 0
    # the heuristic seeds and as many random draws (what genetic starts from) stand beside the LLM's
    # initial proposals: half of the rest of the population each
    origins = adaptive["origins"]
    assert "uniform" in origins
    seeds = sum(1 for o in ("uniform", "owl") if o in origins)
    assert origins["random"]["made"] == (8 - seeds) // 2, origins
    # the summary table says how the offspring were shared, first and last generation
    shared = [g["shares"] for g in adaptive["generations"] if "shares" in g]
    first, last = shared[0], shared[-1]
    line = shares_line(adaptive["generations"])
    assert line in summary_table(adaptive).splitlines()
    assert (f"crossover {first['llm-crossover']}/{first['crossover']} -> {last['llm-crossover']}/{last['crossover']}"
            in line)
    assert shares_line(genetic["generations"]) is None and "offspring shares" not in summary_table(genetic)


def test_the_papers_fixed_allocation_gives_the_llm_every_offspring(tiny_job):
    with HostileChat() as server:
        fixed = search(tiny_job, "fixed", url=server.url, allocation="fixed")
    assert all(llm_share(g) == 1.0 for g in fixed["generations"] if "shares" in g)
    assert not {"uniform", "random", "crossover"} & set(fixed["origins"])
    assert "crossover 4/0 -> 4/0, mutation 4/0 -> 4/0;" in summary_table(fixed)


def logged(generation: int, slots: tuple) -> dict:
    """A `generation_log` entry as strategy.py writes it, with these slots per arm."""
    arms = ("llm-crossover", "crossover", "llm-mutation", "mutation", "llm-selection", "tournament")
    return {"generation": generation, "best": 1.0, "shares": dict(zip(arms, slots))}


def test_the_summary_line_reads_first_and_last_generation():
    log = [{"generation": 0, "best": 2.0}, logged(1, (5, 5, 5, 5, 10, 0)), logged(2, (3, 7, 4, 6, 5, 2)),
           logged(3, (1, 9, 2, 8, 2, 1))]
    assert shares_line(log) == ("offspring shares LLM/classical, generation 1 -> 3: crossover 5/5 -> 1/9, "
                                "mutation 5/5 -> 2/8; LLM offspring's parents by LLM selection/tournament 10/0 -> 2/1")
    assert shares_line(log[:2]) == ("offspring shares LLM/classical, generation 1: crossover 5/5, mutation 5/5; "
                                    "LLM offspring's parents by LLM selection/tournament 10/0")
    assert shares_line(log[:1]) is None and shares_line([]) is None
