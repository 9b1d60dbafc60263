"""How candidates look to the LLM, and the JSON schemas its replies must match.

Rates go to and come from the LLM as integer percents (`[30,25,...]`) when the grid is a
whole number of percent: with tokenizers that split digits (SmolLM2, Qwen2.5, LLaMA-3)
`30,` is three tokens where `0.30, ` is six, and integers carry the grid exactly. A grid
finer than 1 % falls back to decimals. The schemas make a constrained decoder (local
models) or a structured-outputs endpoint produce exactly `count` candidates of exactly
`dim` values, each within [minRate, maxRate] and on the grid; only the mean is left to
the search space's projection. No LLM client is imported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .space import SearchSpace


@dataclass(frozen=True)
class Codec:
    space: SearchSpace

    # -- the encoding ------------------------------------------------------------------
    @property
    def step(self) -> int | None:
        """Percent per grid unit, or None when the grid is finer than 1 % (decimals)."""
        pct = self.space.grid * 100
        return int(round(pct)) if pct >= 1 - 1e-9 and abs(pct - round(pct)) < 1e-9 else None

    @property
    def unit_text(self) -> str:
        s = self.space
        if self.step is None:
            return f"fractions between {s.lo * s.grid:g} and {s.hi * s.grid:g}, multiples of {s.grid:g}"
        lo, hi = s.lo * self.step, s.hi * self.step
        grid = "" if self.step == 1 else f", multiples of {self.step}"
        return f"whole percents between {lo} and {hi}{grid}"

    @property
    def target_text(self) -> str:
        r = self.space.ratio
        return f"{r * 100:g}" if self.step is not None else f"{r:g}"

    def _values(self, units) -> list:
        u = [int(x) for x in units]
        if self.step is None:
            return [round(x * self.space.grid, 10) for x in u]
        return [x * self.step for x in u]

    def fmt(self, units) -> str:
        """A candidate as the LLM reads and writes it (compact JSON)."""
        v = self._values(units)
        if not self.space.separate:
            return "[" + ",".join(f"{x:g}" for x in v) + "]"
        n = self.space.num_blocks
        return ('{"attention":[' + ",".join(f"{x:g}" for x in v[:n]) + '],"mlp":['
                + ",".join(f"{x:g}" for x in v[n:]) + "]}")

    # -- the schemas ---------------------------------------------------------------------
    def rate_schema(self) -> dict:
        s = self.space
        if self.step is None:  # decimals: the grid's values, listed
            return {"type": "number", "enum": [round(u * s.grid, 10) for u in range(s.lo, s.hi + 1)]}
        if self.step == 1:
            return {"type": "integer", "minimum": s.lo, "maximum": s.hi}
        return {"type": "integer", "enum": [u * self.step for u in range(s.lo, s.hi + 1)]}

    def candidate_schema(self) -> dict:
        def rates(n):
            return {"type": "array", "items": self.rate_schema(), "minItems": n, "maxItems": n}

        if not self.space.separate:
            return rates(self.space.dim)
        n = self.space.num_blocks
        return {"type": "object", "properties": {"attention": rates(n), "mlp": rates(n)},
                "required": ["attention", "mlp"], "additionalProperties": False}

    def reply_schema(self, count: int) -> dict:
        return {"type": "object",
                "properties": {"candidates": {"type": "array", "items": self.candidate_schema(),
                                              "minItems": count, "maxItems": count}},
                "required": ["candidates"], "additionalProperties": False}

    # -- reading replies -------------------------------------------------------------------
    def decode(self, raw) -> tuple[np.ndarray | None, bool]:
        """A reply's candidate as rates (fractions), and whether it was valid as written (right
        shape, numbers within bounds and on the grid). (None, False) when it cannot be used."""
        s = self.space
        if s.separate and isinstance(raw, dict):
            a, m = raw.get("attention"), raw.get("mlp")
            if not (_numbers(a) and _numbers(m)) or len(a) != s.num_blocks or len(m) != s.num_blocks:
                return None, False
            values = list(a) + list(m)
        elif not s.separate and _numbers(raw) and len(raw) == s.dim:
            values = list(raw)
        else:
            return None, False
        x = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            return None, False
        clean = True
        if self.step is not None:
            if np.all(np.abs(x) <= 1) and np.any(x != np.round(x)):
                x, clean = x * 100, False  # fractions where percents were asked: read, but not clean
            units = x / self.step
        else:
            units = x / s.grid
        on_grid = np.allclose(units, np.round(units), atol=1e-6)
        in_bounds = bool(np.all(np.round(units) >= s.lo) and np.all(np.round(units) <= s.hi))
        return units * s.grid, clean and on_grid and in_bounds


def _numbers(v) -> bool:
    return isinstance(v, list) and bool(v) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def selection_schema(pairs: int, singles: int, population: int) -> dict:
    """The LLM's choice of parents: `pairs` crossover pairs and `singles` mutation parents,
    as 1-based indices into the numbered population."""
    index = {"type": "integer", "minimum": 1, "maximum": population}
    pair = {"type": "array", "items": index, "minItems": 2, "maxItems": 2}
    return {"type": "object",
            "properties": {"crossover": {"type": "array", "items": pair, "minItems": pairs, "maxItems": pairs},
                           "mutation": {"type": "array", "items": index, "minItems": singles, "maxItems": singles}},
            "required": ["crossover", "mutation"], "additionalProperties": False}


def moves_schema(codec: Codec, max_moves: int = 4, max_percent: int = 10) -> dict:
    """A mutation as edits: 1..max_moves moves [from block, to block, percent], indices 0-based."""
    space, step = codec.space, codec.step or 1
    amount = ({"type": "integer", "minimum": 1, "maximum": max_percent} if step == 1 else
              {"type": "integer", "enum": list(range(step, max_percent + 1, step)) or [step]})
    index = {"type": "integer", "minimum": 0, "maximum": space.dim - 1}
    move = {"type": "array", "prefixItems": [index, index, amount], "items": False, "minItems": 3, "maxItems": 3}
    return {"type": "object",
            "properties": {"moves": {"type": "array", "items": move, "minItems": 1, "maxItems": max_moves}},
            "required": ["moves"], "additionalProperties": False}


def take_schema(space: SearchSpace) -> dict:
    """A crossover as a choice per block: a string of A and B, one letter per rate."""
    return {"type": "object",
            "properties": {"take": {"type": "string", "pattern": f"^[AB]{{{space.dim}}}$"}},
            "required": ["take"], "additionalProperties": False}


def projection_distance(space: SearchSpace, proposal: np.ndarray, units: np.ndarray) -> float:
    """How far projection moved a proposal, as the mean absolute change of a rate."""
    return float(np.mean(np.abs(space.rates(units) - proposal))) if proposal.size else math.nan
