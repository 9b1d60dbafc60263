"""Classical variation operators on grid-unit candidates; every result is projected.

They are the `genetic` strategy's operators and the fallback whenever an LLM reply
cannot be used, so the LLM and the classical search differ only in who proposes.
"""

from __future__ import annotations

import numpy as np

from .space import SearchSpace


def crossover(space: SearchSpace, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uniform crossover of two parents' rates, then projection back onto the constraint."""
    take_a = rng.random(space.dim) < 0.5
    child = np.where(take_a, space.rates(a), space.rates(b))
    return space.project(child)


def mutate(space: SearchSpace, parent: np.ndarray, rng: np.random.Generator, moves: int | None = None,
           max_step: int = 5) -> np.ndarray:
    """Level-switch mutation: move a few grid steps from one block to another, which keeps
    the mean exactly (EvoPress-style); weighted spaces are re-projected."""
    u = np.array(parent, dtype=np.int64)
    moves = moves if moves is not None else int(rng.integers(1, 4))
    for _ in range(moves):
        i, j = rng.choice(space.dim, size=2, replace=False)
        step = int(rng.integers(1, max_step + 1))
        step = min(step, space.hi - u[i], u[j] - space.lo)
        if step > 0:
            u[i] += step
            u[j] -= step
    if space.separate:
        u = space.project(space.rates(u))
    return u


def tournament(fitness: list[float], rng: np.random.Generator, size: int = 3) -> int:
    """Index of the best (lowest fitness) of `size` random members."""
    picks = rng.choice(len(fitness), size=min(size, len(fitness)), replace=False)
    return int(min(picks, key=lambda i: fitness[i]))


def apply_moves(space: SearchSpace, parent: np.ndarray, moves: list) -> np.ndarray | None:
    """An edit written by the LLM: each move (i, j, units) takes `units` grid steps of pruning
    from block i and gives them to block j, clipped at the bounds, so the mean is kept; None
    when no move changes anything. Weighted (separate-rate) spaces are re-projected."""
    u = np.array(parent, dtype=np.int64)
    for i, j, step in moves:
        step = min(int(step), space.hi - u[j], u[i] - space.lo)
        if i != j and step > 0:
            u[i] -= step
            u[j] += step
    if np.array_equal(u, parent):
        return None
    return space.project(space.rates(u)) if space.separate else u


def take(space: SearchSpace, a: np.ndarray, b: np.ndarray, pattern: str) -> np.ndarray:
    """A crossover written by the LLM: block k's rate from parent A or B as pattern[k] says,
    then projected back onto the constraint."""
    choose_a = np.array([c == "A" for c in pattern[: space.dim]] + [True] * max(0, space.dim - len(pattern)))
    return space.project(np.where(choose_a, space.rates(a), space.rates(b)))
