"""The search space: per-block rates under mean(r) = β, bounds and a grid.

Candidates are kept as integer grid units (rate = units × grid), so "on the grid" and
"the same candidate" are exact. `project` maps any proposal to the nearest feasible
point: first the Euclidean projection onto {Σ wᵢrᵢ = β·Σwᵢ, r_min ≤ rᵢ ≤ r_max}
(bisection on the multiplier), then rounding to the grid that keeps the weighted sum
closest to its target (largest remainders first). Deterministic; a feasible input comes
back unchanged.

With separate attention and MLP rates a candidate is [attention rates, MLP rates]
(2 × blocks) and the weights are the parameters each rate controls, so the constraint
is on the fraction of prunable parameters removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..structure import Rates


@dataclass(frozen=True)
class SearchSpace:
    num_blocks: int
    ratio: float  # β
    min_rate: float = 0.0
    max_rate: float = 0.8
    grid: float = 0.01
    separate: bool = False
    attention_weight: float = 1.0  # params one attention rate controls (separate rates)
    mlp_weight: float = 1.0

    @property
    def dim(self) -> int:
        return 2 * self.num_blocks if self.separate else self.num_blocks

    @property
    def weights(self) -> np.ndarray:
        if not self.separate:
            return np.ones(self.num_blocks)
        a, m = self.attention_weight, self.mlp_weight
        scale = 2 / (a + m)  # mean weight 1 keeps the arithmetic well-conditioned
        return np.concatenate([np.full(self.num_blocks, a * scale), np.full(self.num_blocks, m * scale)])

    @property
    def lo(self) -> int:
        return math.ceil(self.min_rate / self.grid - 1e-9)

    @property
    def hi(self) -> int:
        return math.floor(self.max_rate / self.grid + 1e-9)

    def rates(self, units) -> np.ndarray:
        return np.asarray(units, dtype=np.float64) * self.grid

    def mean(self, units) -> float:
        w = self.weights
        return float(w @ self.rates(units) / w.sum())

    def key(self, units) -> tuple[int, ...]:
        """Identity of a candidate, for the cache and duplicate checks."""
        return tuple(int(u) for u in units)

    def to_rates(self, units) -> Rates:
        r = [round(float(x), 10) for x in self.rates(units)]
        if self.separate:
            return Rates(attention=tuple(r[: self.num_blocks]), mlp=tuple(r[self.num_blocks:]))
        return Rates(block=tuple(r))

    def uniform(self) -> np.ndarray:
        return self.project(np.full(self.dim, self.ratio))

    def random(self, rng: np.random.Generator) -> np.ndarray:
        return self.project(rng.uniform(self.min_rate, self.max_rate, self.dim))

    def is_feasible(self, units) -> bool:
        u = np.asarray(units)
        if u.shape != (self.dim,) or u.min() < self.lo or u.max() > self.hi:
            return False
        return bool(np.array_equal(self.project(self.rates(u)), u))

    # -- projection ------------------------------------------------------------------
    def project(self, proposal) -> np.ndarray:
        """Nearest feasible candidate (integer grid units) to a proposal of rates."""
        x = np.asarray(proposal, dtype=np.float64).reshape(-1)
        if x.shape != (self.dim,):
            raise ValueError(f"a candidate has {self.dim} rates, got {x.shape[0]}")
        x = np.nan_to_num(x, nan=self.ratio, posinf=self.max_rate, neginf=self.min_rate)
        w = self.weights
        lo, hi = self.lo * self.grid, self.hi * self.grid
        target = self.ratio * w.sum()

        def total(tau):
            return w @ np.clip(x - tau * w, lo, hi)

        # Σ w·clip(x - τw) decreases in τ: bisection finds the multiplier
        a, b = float(np.min((x - hi) / w)) - 1, float(np.max((x - lo) / w)) + 1
        if abs(total(0.0) - target) < 1e-12:
            y = np.clip(x, lo, hi)
        else:
            for _ in range(200):
                mid = (a + b) / 2
                if total(mid) > target:
                    a = mid
                else:
                    b = mid
            y = np.clip(x - (a + b) / 2 * w, lo, hi)
        return self._round(y / self.grid, w, target / self.grid)

    def _round(self, u: np.ndarray, w: np.ndarray, target_units: float) -> np.ndarray:
        base = np.floor(u + 1e-9).astype(np.int64)
        base = np.clip(base, self.lo, self.hi)
        remainder = u - base
        order = sorted(range(len(u)), key=lambda i: (-round(remainder[i], 9), i))
        deficit = target_units - float(w @ base)
        for i in order:  # add one step where it brings the weighted sum closer
            if base[i] < self.hi and abs(deficit - w[i]) < abs(deficit) - 1e-12:
                base[i] += 1
                deficit -= w[i]
        if abs(deficit) > w.min() / 2 + 1e-9:  # still off (bounds bit): move any free coordinate
            step = 1 if deficit > 0 else -1
            for i in order:
                while (self.lo <= base[i] + step <= self.hi) and abs(deficit - step * w[i]) < abs(deficit) - 1e-12:
                    base[i] += step
                    deficit -= step * w[i]
        return base
