"""The ask/tell interface every strategy implements, and what flows through it.

`ask()` returns evaluation requests (a candidate and a fidelity); `tell()` receives
their results. A strategy may ask several times per generation (screen, then full);
the loop checkpoints whenever `at_boundary` is true, and an empty `ask()` means done.
State is plain JSON, so a search resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from .space import SearchSpace


@dataclass
class Request:
    units: np.ndarray
    tokens: int  # fidelity
    origin: str  # who proposed it: uniform, random, crossover, mutation, llm-..., ...
    parent_fitness: float | None = None  # the better parent's fitness (offspring only)
    sample: int | None = None  # windows drawn afresh with this seed; None: the fixed windows
    arms: tuple[str, ...] = ()  # the operators whose share this offspring came from (allocation.py)


@dataclass
class Stage:
    """One screen of staged selection: every candidate still in is scored on `tokens` (windows
    drawn afresh) and the best `survivors` go on, or the best `keep` share (at least one)."""

    tokens: int
    survivors: int | None = None
    keep: float | None = None

    def kept(self, n: int) -> int:
        if self.survivors is not None:
            return min(n, self.survivors)
        return min(n, max(1, math.ceil((self.keep or 1.0) * n)))


def sample_seed(seed: int, generation: int, stage: int) -> int:
    """The seed of a screen's fresh windows: a function of the search's seed and where the screen
    is, not a draw from the search's generator, so a resumed run draws the same windows and the
    evaluations already in the history are found again."""
    digest = hashlib.sha256(f"{seed}:{generation}:{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


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
    stages: list[Stage] = field(default_factory=list)  # screens before the full evaluation
    budget: float = 430.0  # full-fidelity evaluation equivalents
    open_ended: bool = False  # the budget was given: generations go on until it is spent
    seed: int = 0
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
        # per generation: best fitness, LLM seconds and evaluation seconds (what each costs)
        self.generation_log: list[dict] = []
        self._llm_seconds = 0.0
        self._evaluation_seconds = 0.0
        # per origin: offspring made, how many entered the population, improvement over the better parent
        self.origins: dict[str, dict] = {}
        self.projection = {"n": 0, "sum": 0.0, "max": 0.0}  # how far projection moved LLM candidates
        self.shares: dict[str, int] = {}  # this generation's offspring per operator (allocation.py)

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
            self._evaluation_seconds += r.seconds or 0.0

    def note_llm_seconds(self, seconds: float) -> None:
        self._llm_seconds += seconds

    def note_projection(self, distance: float) -> None:
        p = self.projection
        p["n"] += 1
        p["sum"] += distance
        p["max"] = max(p["max"], distance)

    def note_offspring(self, origin: str, entered: bool, parent_fitness: float | None, fitness: float | None) -> None:
        o = self.origins.setdefault(origin, {"made": 0, "entered": 0, "improvement_sum": 0.0, "improvement_n": 0})
        o["made"] += 1
        o["entered"] += int(entered)
        if parent_fitness is not None and fitness is not None and parent_fitness > 0:
            o["improvement_sum"] += (parent_fitness - fitness) / parent_fitness
            o["improvement_n"] += 1

    def offspring_cost(self, n: int, stages: list[Stage] | None = None) -> float:
        """Budget that `n` offspring take at most through the stages and the full evaluation."""
        cost = 0.0
        for stage in self.ctx.stages if stages is None else stages:
            cost += n * stage.tokens / self.ctx.full_tokens
            n = stage.kept(n)
        return cost + n

    def affordable(self, n: int, stages: list[Stage] | None = None, always: bool = False) -> int:
        """How many of `n` offspring the budget left still pays for (all of them unless the budget
        was given, or `always`: a strategy that spends the budget whatever the spec says)."""
        if not (self.ctx.open_ended or always):
            return n
        left = self.ctx.budget - self.spent + 1e-9
        while n > 0 and self.offspring_cost(n, stages) > left:
            n -= 1
        return n

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def best(self) -> Member | None:
        return min(self.population, key=lambda m: m.fitness) if self.population else None

    def record_generation(self) -> None:
        best = self.best()
        self.best_per_generation.append(best.fitness if best else float("nan"))
        self.generation_log.append({"generation": self.generation, "best": self.best_per_generation[-1],
                                    "llm_seconds": round(self._llm_seconds, 3),
                                    "evaluation_seconds": round(self._evaluation_seconds, 3),
                                    **({"shares": self.shares} if self.shares else {})})
        self._llm_seconds = self._evaluation_seconds = 0.0
        self.shares = {}

    def state(self) -> dict:
        return {
            "name": self.name,
            "generation": self.generation,
            "spent": self.spent,
            "population": [m.__dict__ for m in self.population],
            "best_per_generation": self.best_per_generation,
            "counters": self.counters,
            "generation_log": self.generation_log,
            "origins": self.origins,
            "projection": self.projection,
            "extra": self.extra_state(),
        }

    def load_state(self, state: dict) -> None:
        self.generation = state["generation"]
        self.spent = state["spent"]
        self.population = [Member(**m) for m in state["population"]]
        self.best_per_generation = list(state["best_per_generation"])
        self.counters = dict(state["counters"])
        self.generation_log = list(state.get("generation_log", []))
        self.origins = {k: dict(v) for k, v in state.get("origins", {}).items()}
        self.projection = dict(state.get("projection", self.projection))
        self.load_extra_state(state.get("extra") or {})

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, extra: dict) -> None:
        pass
