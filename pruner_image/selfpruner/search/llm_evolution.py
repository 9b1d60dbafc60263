"""Self-Pruner: the LLM writes the initial population and every generation's offspring.

Prompts are templates in `prompts/`. One call may return many offspring. A reply that
cannot be parsed, has the wrong length, or breaks bounds/grid/mean is repaired by
projection when it has the right length, or replaced by a classical operator; a
repeated candidate is replaced by a mutation of it. All of that is counted, never fatal.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from string import Template

import numpy as np

from . import operators
from .evolution import ClassicalProposer, Evolution
from .llm_clients import LLMError

PROMPTS = resources.files("selfpruner.search") / "prompts"


def template(name: str) -> Template:
    return Template((PROMPTS / f"{name}.txt").read_text())


NUMBER_LIST = re.compile(r"\[\s*-?\d+(?:\.\d*)?(?:\s*,\s*-?\d+(?:\.\d*)?)*\s*\]")


def parse_candidates(text: str) -> list | None:
    """The list of candidates in a reply, or None if there is nothing usable.

    Proper JSON first; failing that, every complete list of numbers in the text is
    salvaged (small models often write good candidates and then ramble, or run out of
    tokens mid-list)."""
    found = _parse_json(text)
    if found is not None:
        return found
    salvaged = [json.loads(m) for m in NUMBER_LIST.findall(text)]
    return salvaged or None


def _parse_json(text: str) -> list | None:
    text = text.strip()
    text = re.sub(r"^```(?:json)?|```$", "", text, flags=re.MULTILINE).strip()
    for opener, closer in (("{", "}"), ("[", "]")):
        start, end = text.find(opener), text.rfind(closer)
        if start == -1 or end <= start:
            continue
        try:
            data = json.loads(text[start:end + 1])
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            data = data.get("candidates", data.get("children", data.get("mutants")))
        if isinstance(data, list) and data and all(isinstance(c, list) for c in data):
            return data
        if isinstance(data, list) and data and all(isinstance(v, (int, float)) for v in data):
            return [data]  # a single bare candidate
    return None


class LLMProposer(ClassicalProposer):
    def __init__(self, llm, description: dict, per_call: int = 5):
        self.llm = llm  # a Transcript
        self.description = description
        self.per_call = per_call

    # -- prompts ---------------------------------------------------------------------
    def _fill(self, name: str, strategy: Evolution, **extra) -> list[dict]:
        space = strategy.ctx.space
        values = dict(self.description)
        values.update(dim=space.dim, ratio=space.ratio, min_rate=space.lo * space.grid,
                      max_rate=space.hi * space.grid, grid=space.grid,
                      uniform_example=self._fmt(space, space.uniform()), **extra)
        system = (PROMPTS / "system.txt").read_text().strip()
        return [{"role": "system", "content": system},
                {"role": "user", "content": template(name).substitute(values).strip()}]

    @staticmethod
    def _fmt(space, units) -> str:
        return "[" + ", ".join(f"{r:.2f}" for r in space.rates(units)) + "]"

    def _population_text(self, strategy: Evolution, top: int = 5) -> str:
        space = strategy.ctx.space
        return "\n".join(f"{m.fitness:.3f}: {self._fmt(space, m.units)}" for m in strategy.population[:top])

    # -- turning replies into candidates ---------------------------------------------
    def _accept(self, strategy: Evolution, raw, fallback, kind: str) -> tuple[np.ndarray, str]:
        space = strategy.ctx.space
        strategy.count("llm_offspring_asked")
        if not isinstance(raw, list) or len(raw) != space.dim or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw
        ):
            strategy.count("llm_replaced")
            return strategy.fresh(fallback()), kind
        proposal = np.asarray(raw, dtype=np.float64)
        units = space.project(proposal)
        origin = f"llm-{kind}"
        if np.allclose(space.rates(units), proposal, atol=1e-9):
            strategy.count("llm_as_written")
        else:
            strategy.count("llm_repaired")
            origin += "-repaired"
        if space.key(units) in strategy.seen:
            strategy.count("llm_duplicates")
            origin = f"llm-{kind}-deduplicated"
        return strategy.fresh(units), origin

    def _ask(self, strategy: Evolution, name: str, fallbacks: list, kind: str, **extra) -> list:
        """One call for len(fallbacks) offspring; a missing or bad item i becomes fallbacks[i]()."""
        n = len(fallbacks)
        try:
            reply = self.llm.chat(self._fill(name, strategy, count=n, **extra), kind=kind)
            items = parse_candidates(reply.text) or []
            if not items:
                strategy.count("llm_unparseable_replies")
        except LLMError:
            strategy.count("llm_failed_calls")
            items = []
        items = (items + [None] * n)[:n]
        return [self._accept(strategy, raw, fb, kind) for raw, fb in zip(items, fallbacks)]

    # -- the proposer interface ------------------------------------------------------
    def initial(self, strategy: Evolution, n: int) -> list[tuple[np.ndarray, str]]:
        ctx, out = strategy.ctx, []
        while len(out) < n:
            k = min(self.per_call, n - len(out))
            out += self._ask(strategy, "initial", [lambda: ctx.space.random(ctx.rng)] * k, "initial")
        return out

    def offspring(self, strategy: Evolution) -> list[tuple[np.ndarray, str]]:
        ctx, pop = strategy.ctx, strategy.population
        fitness = [m.fitness for m in pop]
        pick = lambda: pop[operators.tournament(fitness, ctx.rng)]  # noqa: E731
        population = self._population_text(strategy)
        out = []
        pairs = [(pick(), pick()) for _ in range(strategy.crossovers)]
        for start in range(0, len(pairs), self.per_call):
            chunk = pairs[start:start + self.per_call]
            text = "\n".join(f"{i + 1}. A = {self._fmt(ctx.space, a.units)} (perplexity {a.fitness:.3f}); "
                             f"B = {self._fmt(ctx.space, b.units)} (perplexity {b.fitness:.3f})"
                             for i, (a, b) in enumerate(chunk))
            fallbacks = [lambda a=a, b=b: operators.crossover(ctx.space, np.array(a.units), np.array(b.units), ctx.rng)
                         for a, b in chunk]
            out += self._ask(strategy, "crossover", fallbacks, "crossover", population=population, parents=text)
        parents = [pick() for _ in range(strategy.mutations)]
        for start in range(0, len(parents), self.per_call):
            chunk = parents[start:start + self.per_call]
            text = "\n".join(f"{i + 1}. {self._fmt(ctx.space, p.units)} (perplexity {p.fitness:.3f})"
                             for i, p in enumerate(chunk))
            fallbacks = [lambda p=p: operators.mutate(ctx.space, np.array(p.units), ctx.rng) for p in chunk]
            out += self._ask(strategy, "mutation", fallbacks, "mutation", population=population, parents=text)
        return out


class LLMEvolution(Evolution):
    name = "llm-evolution"

    def extra_state(self) -> dict:
        state = super().extra_state()
        state["llm_calls"] = self.proposer.llm.calls
        return state

    def load_extra_state(self, extra: dict) -> None:
        super().load_extra_state(extra)
        self.proposer.llm.rewind(extra.get("llm_calls", 0))
