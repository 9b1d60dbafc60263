"""Who writes each generation's offspring: operators share the offspring by their measured success.

The paper lets the LLM write every crossover and mutation and pick every parent. Measured here,
the LLMs that run on one GPU write offspring that enter the population less often than classical
ones, so a run that trusts them blindly ends worse than `genetic`. So each generation's crossover
slots are shared between the LLM's crossover and the classical one, its mutation slots between
the LLM's mutation and the classical one, and the LLM offspring's parents between the LLM's
selection and tournament selection (`llm.allocation: adaptive`, the default). The shares follow
each arm's success, an offspring entering the population (surviving every screen and the cut to
κ), as a Beta(1, 1) posterior mean over discounted counts (older generations weigh less, so an
arm that improves or degrades is noticed), sharpened by a power so that a clearly worse arm gets
little, with a floor so that every arm keeps being tried. A weak or hostile endpoint then costs a
few offspring a generation; a strong one earns most of them. `llm.allocation: fixed` is the
paper's: every offspring is the LLM's.

Everything here is deterministic in the counts (no random draw), so a resumed search makes the
same allocation.
"""

from __future__ import annotations

import math

DISCOUNT = 0.7  # weight of a generation's counts one generation later
SHARPNESS = 4.0  # shares go as the success rate to this power
FLOOR = 0.1  # every arm gets at least this share of its slots (and one slot where there are enough)

LLM_CROSSOVER, CROSSOVER = "llm-crossover", "crossover"
LLM_MUTATION, MUTATION = "llm-mutation", "mutation"
LLM_SELECTION, TOURNAMENT = "llm-selection", "tournament"
GROUPS = {"crossover": (LLM_CROSSOVER, CROSSOVER), "mutation": (LLM_MUTATION, MUTATION),
          "selection": (LLM_SELECTION, TOURNAMENT)}


def success(stats: dict, arm: str) -> float:
    """Posterior mean of an arm's success rate: Beta(1, 1) prior, discounted counts."""
    s = stats.get(arm) or {}
    return (s.get("entered", 0.0) + 1.0) / (s.get("made", 0.0) + 2.0)


def split(n: int, weights: list[float], floor: float = FLOOR) -> list[int]:
    """`n` slots over arms with these weights: each arm at least ceil(floor * n) (when n allows one
    for each), the rest in proportion to the weights by largest remainder, ties to the first arm."""
    k = len(weights)
    if n <= 0 or k == 0:
        return [0] * k
    least = min(math.ceil(floor * n), n // k) if floor > 0 else 0
    counts = [least] * k
    rest = n - least * k
    total = sum(weights) or 1.0
    exact = [rest * w / total for w in weights]
    counts = [c + int(e) for c, e in zip(counts, exact)]
    order = sorted(range(k), key=lambda i: (-(exact[i] - int(exact[i])), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


class Allocation:
    """The arms' discounted success counts, and the split of a generation's slots they imply."""

    def __init__(self, adaptive: bool = True):
        self.adaptive = adaptive
        self.stats: dict[str, dict[str, float]] = {}

    def shares(self, group: str, n: int) -> dict[str, int]:
        """{arm: slots} for one group (crossover, mutation or selection) of `n` slots."""
        llm, classical = GROUPS[group]
        if not self.adaptive:
            return {llm: n, classical: 0}
        weights = [success(self.stats, arm) ** SHARPNESS for arm in (llm, classical)]
        a, b = split(n, weights)
        return {llm: a, classical: b}

    def credit(self, arms: tuple[str, ...] | list[str], entered: bool) -> None:
        for arm in arms:
            s = self.stats.setdefault(arm, {"made": 0.0, "entered": 0.0})
            s["made"] += 1.0
            s["entered"] += float(entered)

    def end_generation(self) -> None:
        for s in self.stats.values():
            s["made"] *= DISCOUNT
            s["entered"] *= DISCOUNT

    def state(self) -> dict:
        return {"adaptive": self.adaptive, "stats": self.stats}

    def load(self, state: dict) -> None:
        self.stats = {k: dict(v) for k, v in (state.get("stats") or {}).items()}
