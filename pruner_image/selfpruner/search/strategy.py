"""The ask/tell interface every strategy implements, and what flows through it.

`ask()` returns evaluation requests (a candidate and a fidelity); `tell()` receives
their results. A strategy may ask several times per generation (screen, then full);
the loop checkpoints whenever `at_boundary` is true, and an empty `ask()` means done.
State is plain JSON, so a search resumes from its last checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .space import SearchSpace


@dataclass
class Request:
    units: np.ndarray
    tokens: int  # fidelity
    origin: str  # who proposed it: uniform, random, crossover, mutation, llm-..., ...


@dataclass
class Result:
    fitness: float | None  # perplexity; None if the evaluation failed
    tokens: int
    seconds: float
    cached: bool = False
    error: str | None = None


@dataclass
class Member:
    units: list[int]
    fitness: float
    origin: str = ""


@dataclass
class Context:
    """What strategies share: the space, the fidelities, the budget, randomness, the LLM."""

    space: SearchSpace
    full_tokens: int
    screen_tokens: int = 0
    screen_keep: float = 0.5
    budget: float = 430.0  # full-fidelity evaluation equivalents
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    llm: object | None = None  # an LLM proposer (llm-evolution only)
    prior: dict | None = None  # per-block calibration statistics (OWL, the LLM's prompt)


class Strategy:
    name = "base"

    def __init__(self, ctx: Context, population: int = 30, generations: int = 20, crossovers: int = 10,
                 mutations: int = 10):
        self.ctx = ctx
        self.population_size = population
        self.generations = generations
        self.crossovers = crossovers
        self.mutations = mutations
        self.generation = 0  # completed generations (0: initial population)
        self.spent = 0.0  # budget used, in full-evaluation equivalents
        self.population: list[Member] = []
        self.best_per_generation: list[float] = []
        self.at_boundary = True
        self.counters: dict[str, int] = {}

    # -- to implement ----------------------------------------------------------------
    def ask(self) -> list[Request]:
        raise NotImplementedError

    def tell(self, requests: list[Request], results: list[Result]) -> None:
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------
    def charge(self, results: list[Result]) -> None:
        for r in results:
            if not r.cached:
                self.spent += r.tokens / self.ctx.full_tokens

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def best(self) -> Member | None:
        return min(self.population, key=lambda m: m.fitness) if self.population else None

    def record_generation(self) -> None:
        best = self.best()
        self.best_per_generation.append(best.fitness if best else float("nan"))

    def state(self) -> dict:
        return {
            "name": self.name,
            "generation": self.generation,
            "spent": self.spent,
            "population": [m.__dict__ for m in self.population],
            "best_per_generation": self.best_per_generation,
            "counters": self.counters,
            "extra": self.extra_state(),
        }

    def load_state(self, state: dict) -> None:
        self.generation = state["generation"]
        self.spent = state["spent"]
        self.population = [Member(**m) for m in state["population"]]
        self.best_per_generation = list(state["best_per_generation"])
        self.counters = dict(state["counters"])
        self.load_extra_state(state.get("extra") or {})

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, extra: dict) -> None:
        pass
