"""The evolutionary loop of the paper: κ survivors, offspring by crossover and mutation,
best κ of parents ∪ offspring survive. Who proposes offspring is pluggable: classical
operators (`genetic`, the ablation the paper lacks) or an LLM (`llm-evolution`).

With staged selection (`fitness.stages`, or the one stage of `screenTokens`/`screenKeep`),
each generation's offspring go through the screens in turn, each on windows drawn afresh, and
only the last screen's survivors are evaluated at full fidelity; survivors of the generation
are chosen on full fidelity only. With a budget given (`search.budget`) generations go on
until it is spent, the last one cut to what is left.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import operators
from .strategy import Member, Request, Result, Strategy, sample_seed


@dataclass
class Offspring:
    units: np.ndarray
    origin: str
    parent_fitness: float | None = None  # the better parent's fitness; None for an initial member
    arms: tuple[str, ...] = ()  # the operators (and selection) whose share it came from: credited with its fate


class ClassicalProposer:
    """Random initial population; tournament parents; uniform crossover; level-switch mutation."""

    def initial(self, strategy: "Evolution", n: int) -> list[Offspring]:
        return [Offspring(strategy.fresh(strategy.ctx.space.random(strategy.ctx.rng)), "random") for _ in range(n)]

    def offspring(self, strategy: "Evolution") -> list[Offspring]:
        return self.classical(strategy, strategy.crossovers, strategy.mutations)

    @staticmethod
    def classical(strategy: "Evolution", crossovers: int, mutations: int) -> list[Offspring]:
        """`crossovers` uniform crossovers and `mutations` level-switch mutations of tournament
        parents (llm-evolution's classical share too, credited to those operators)."""
        ctx, pop = strategy.ctx, strategy.population
        fitness = [m.fitness for m in pop]
        out = []
        for _ in range(crossovers):
            a = pop[operators.tournament(fitness, ctx.rng)]
            b = pop[operators.tournament(fitness, ctx.rng)]
            child = operators.crossover(ctx.space, np.array(a.units), np.array(b.units), ctx.rng)
            out.append(Offspring(strategy.fresh(child), "crossover", min(a.fitness, b.fitness), ("crossover",)))
        for _ in range(mutations):
            p = pop[operators.tournament(fitness, ctx.rng)]
            out.append(Offspring(strategy.fresh(operators.mutate(ctx.space, np.array(p.units), ctx.rng)), "mutation",
                                 p.fitness, ("mutation",)))
        return out


class Evolution(Strategy):
    name = "genetic"

    def __init__(self, ctx, proposer=None, **kw):
        super().__init__(ctx, **kw)
        self.proposer = proposer or ClassicalProposer()
        self.allocation = None  # an Allocation where operators share the offspring (llm-evolution)
        self.seen: set[tuple[int, ...]] = set()
        self._pending: list[Offspring] = []  # offspring of the generation under way
        self._phase = "propose"  # propose, stage (screen number self._stage), full
        self._stage = 0

    # -- duplicates ----------------------------------------------------------------
    def fresh(self, units: np.ndarray, origin_counter: str | None = None) -> np.ndarray:
        """`units` if never seen, else a mutation of it that is new (counted)."""
        space, rng = self.ctx.space, self.ctx.rng
        tries = 0
        while space.key(units) in self.seen and tries < 50:
            units = operators.mutate(space, units, rng)
            tries += 1
            self.count("duplicates_replaced")
        self.seen.add(space.key(units))
        return units

    # -- ask / tell ------------------------------------------------------------------
    def finished(self) -> bool:
        if self.generation > 0 and not self.population:
            return True
        if self.ctx.open_ended:
            return self.generation > 0 and self.affordable(1) == 0
        return self.generation > self.generations

    def ask(self) -> list[Request]:
        ctx = self.ctx
        if self._phase == "propose":
            if self.finished():
                return []
            self.at_boundary = False
            if self.generation == 0:
                self._pending = self.proposer.initial(self, self.population_size)
                self._phase = "full"
            else:
                offspring = self.proposer.offspring(self)
                self._pending = offspring[:self.affordable(len(offspring))]
                self._phase, self._stage = ("stage" if ctx.stages else "full"), 0
            if not self._pending:
                self._phase = "propose"
                return []
        if self._phase == "stage":
            stage = ctx.stages[self._stage]
            sample = sample_seed(ctx.seed, self.generation, self._stage)
            return [Request(units=o.units, tokens=stage.tokens, origin=o.origin, parent_fitness=o.parent_fitness,
                            sample=sample, arms=o.arms) for o in self._pending]
        return [Request(units=o.units, tokens=ctx.full_tokens, origin=o.origin, parent_fitness=o.parent_fitness,
                        arms=o.arms) for o in self._pending]

    def tell(self, requests: list[Request], results: list[Result]) -> None:
        self.charge(results)
        scored = [(req, res) for req, res in zip(requests, results) if res.fitness is not None]
        self.count("failed_evaluations", len(results) - len(scored))
        if self._phase == "stage":
            keep = self.ctx.stages[self._stage].kept(len(scored))
            best = sorted(scored, key=lambda rr: rr[1].fitness)[:keep]
            self.count("screened", len(requests))
            self.count(f"screened_stage_{self._stage}", len(requests))
            kept = {id(req) for req, _ in best}
            for req in requests:
                if id(req) not in kept:  # screened out: made, never entered
                    self._settle(req, False, None)
            self._pending = [Offspring(req.units, req.origin, req.parent_fitness, req.arms) for req, _ in best]
            self._stage += 1
            if self._stage >= len(self.ctx.stages):
                self._phase = "full"
            if not self._pending:  # every screen evaluation failed: the generation ends here
                self._phase = "full"
                self.tell([], [])
            return
        members = {id(req): Member(units=[int(x) for x in req.units], fitness=res.fitness, origin=req.origin)
                   for req, res in scored}
        merged = self.population + list(members.values())
        merged.sort(key=lambda m: m.fitness)
        self.population = merged[: self.population_size]
        survivors = {id(m) for m in self.population}
        for req, res in zip(requests, results):
            entered = id(req) in members and id(members[id(req)]) in survivors
            self._settle(req, entered, res.fitness)
        if self.allocation is not None:
            self.allocation.end_generation()
        self.record_generation()
        self.generation += 1
        self._pending = []
        self._phase = "propose"
        self.at_boundary = True

    def _settle(self, req: Request, entered: bool, fitness: float | None) -> None:
        """An offspring's fate, once known: screened out (in a screen's tell, fitness None), or its full
        evaluation (None if it failed) and whether it entered the population. Counted per origin and
        credited to the operators that made it."""
        self.note_offspring(req.origin, entered, req.parent_fitness, fitness)
        if self.allocation is not None and req.arms:
            self.allocation.credit(req.arms, entered)

    def extra_state(self) -> dict:
        state = {"seen": sorted(list(k) for k in self.seen)}
        if self.allocation is not None:
            state["allocation"] = self.allocation.state()
        return state

    def load_extra_state(self, extra: dict) -> None:
        self.seen = {tuple(k) for k in extra.get("seen", [])}
        if self.allocation is not None:
            self.allocation.load(extra.get("allocation") or {})
