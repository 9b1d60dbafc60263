"""Simpler allocations behind the same ask/tell interface: uniform, OWL, random search,
and EvoPress's (1+λ) evolution with level-switch mutation and staged selection."""

from __future__ import annotations

import math

import numpy as np

from . import operators
from .strategy import Member, Request, Result, Stage, Strategy, sample_seed


class OneShot(Strategy):
    """Evaluate one fixed allocation."""

    def allocation(self) -> np.ndarray:
        raise NotImplementedError

    def ask(self) -> list[Request]:
        if self.generation > 0:
            return []
        self.at_boundary = False
        return [Request(units=self.allocation(), tokens=self.ctx.full_tokens, origin=self.name)]

    def tell(self, requests, results) -> None:
        self.charge(results)
        self.population = [Member([int(x) for x in q.units], r.fitness, q.origin)
                           for q, r in zip(requests, results) if r.fitness is not None]
        self.record_generation()
        self.generation = 1
        self.at_boundary = True


class Uniform(OneShot):
    name = "uniform"

    def allocation(self) -> np.ndarray:
        return self.ctx.space.uniform()


def owl_rates(outlier_ratio: np.ndarray, ratio: float, lam: float = 0.08) -> np.ndarray:
    """OWL (Yin et al. 2024): blocks with more outliers are pruned less. Rates are spread
    linearly over [β - λ, β + λ] by outlier ratio, highest ratio lowest rate."""
    d = np.asarray(outlier_ratio, dtype=np.float64)
    spread = d.max() - d.min()
    if spread <= 0:
        return np.full_like(d, ratio)
    norm = (d - d.min()) / spread  # 0 .. 1
    return ratio + lam - 2 * lam * norm


class Owl(OneShot):
    name = "owl"

    def allocation(self) -> np.ndarray:
        space, prior = self.ctx.space, self.ctx.prior or {}
        d = np.asarray(prior.get("outlier_ratio", np.zeros(space.num_blocks)))
        r = owl_rates(d, space.ratio)
        if space.separate:
            r = np.concatenate([r, r])
        return space.project(r)


class RandomSearch(Strategy):
    """Feasible random candidates until the budget is spent; the best κ are kept."""

    name = "random"
    batch = 20

    def ask(self) -> list[Request]:
        space, ctx = self.ctx.space, self.ctx
        left = int(math.floor(ctx.budget - self.spent + 1e-9))
        if left <= 0:
            return []
        self.at_boundary = False
        return [Request(units=space.random(ctx.rng), tokens=ctx.full_tokens, origin="random")
                for _ in range(min(self.batch, left))]

    def tell(self, requests, results) -> None:
        self.charge(results)
        if all(r.cached for r in results):
            self.spent += len(results)  # guarantees termination even if every draw repeats
        merged = self.population + [Member([int(x) for x in q.units], r.fitness, q.origin)
                                     for q, r in zip(requests, results) if r.fitness is not None]
        self.population = sorted(merged, key=lambda m: m.fitness)[: self.population_size]
        self.record_generation()
        self.generation += 1
        self.at_boundary = True


class EvoPress(Strategy):
    """(1+λ) evolution from the uniform allocation: λ level-switch mutants of the parent,
    staged selection (the spec's stages, each on windows drawn afresh; by default all on an
    eighth of the tokens, the best `survivors` on full fidelity), and the parent is replaced
    only by a better child. Runs until the budget is spent."""

    name = "evopress"
    offspring = 16
    survivors = 2

    def __init__(self, ctx, **kw):
        super().__init__(ctx, **kw)
        self._stage = "parent"
        self._screen = 0  # which of the stages is under way
        self._children: list[Request] = []

    @property
    def stages(self) -> list[Stage]:
        return self.ctx.stages or [Stage(tokens=max(2, self.ctx.full_tokens // 8), survivors=self.survivors)]

    def ask(self) -> list[Request]:
        ctx, space = self.ctx, self.ctx.space
        if self._stage == "parent":
            self.at_boundary = False
            return [Request(units=space.uniform(), tokens=ctx.full_tokens, origin="uniform")]
        if self._stage == "mutate":
            n = self.affordable(self.offspring, self.stages, always=True)  # the last step: what is left
            if n == 0:
                return []
            self.at_boundary = False
            parent = np.array(self.population[0].units)
            seen = {space.key(parent)}
            children = []
            for _ in range(n):
                child = operators.mutate(space, parent, ctx.rng, moves=1)
                if space.key(child) not in seen:
                    seen.add(space.key(child))
                    children.append(child)
            self._stage, self._screen = "screen", 0
            self._children = [Request(units=c, tokens=0, origin="level-switch") for c in children]
        if self._stage == "screen":
            stage = self.stages[self._screen]
            sample = sample_seed(ctx.seed, self.generation, self._screen)
            return [Request(units=q.units, tokens=stage.tokens, origin=q.origin, sample=sample)
                    for q in self._children]
        return self._children  # stage "full"

    def tell(self, requests, results) -> None:
        self.charge(results)
        scored = [(q, r) for q, r in zip(requests, results) if r.fitness is not None]
        if self._stage == "parent":
            self.population = [Member([int(x) for x in q.units], r.fitness, q.origin) for q, r in scored]
            self._stage = "mutate" if self.population else "done"
        elif self._stage == "screen":
            stage = self.stages[self._screen]
            best = sorted(scored, key=lambda qr: qr[1].fitness)[: stage.kept(len(scored))]
            self.count("screened", len(requests))
            self.count(f"screened_stage_{self._screen}", len(requests))
            self._screen += 1
            last = self._screen >= len(self.stages)
            self._children = [Request(q.units, self.ctx.full_tokens if last else 0, q.origin) for q, _ in best]
            if self._children:
                self._stage = "full" if last else "screen"
                return
            self._stage = "mutate"
        else:
            for q, r in scored:
                if r.fitness < self.population[0].fitness:
                    self.population = [Member([int(x) for x in q.units], r.fitness, q.origin)]
            self._stage = "mutate"
        self.record_generation()
        self.generation += 1
        self.at_boundary = True

    def extra_state(self) -> dict:
        return {"stage": self._stage}

    def load_extra_state(self, extra: dict) -> None:
        self._stage = extra.get("stage", "mutate")
        if self._stage in ("screen", "full"):
            self._stage = "mutate"  # checkpoints are taken at step boundaries only
