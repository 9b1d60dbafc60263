"""What the LLM sees besides the population (`llm.evidence`): the evidence a person pruning by hand
would want before writing the next candidates.

The LLMs that run here write offspring worse than their parents (docs/benchmarks.md §6), and the
paper's prompts show them only the population and, once, the calibration statistics: nothing says
what the search has learnt about each block, nor how the LLM's own proposals did. Each item adds
one paragraph to the selection, crossover and mutation prompts:

- `calibration`: the per-block calibration statistics (outlier ratio, activation size), which the
  initial prompt always has, compactly;
- `correlations`: per position, the Spearman rank correlation of its rate with the fitness over every
  full-fidelity evaluation of the search so far (screens left out): where the search's own history
  says pruning hurts, once there are `MIN_EVALUATIONS` of them;
- `feedback` (crossover and mutation prompts): what the LLM's own offspring of the last generation
  scored against their better parent, and whether they entered the population.

Each helper returns its paragraph ending in a blank line, or "" when it is off or has nothing to say
yet: the templates hold `$calibration$correlations$feedback` at the start of the paragraph they
precede, so that without evidence a prompt is exactly the paper's. Numbers are short (two decimals)
and lists follow the candidates' layout: 30 blocks cost about 100 tokens a paragraph, for models with
an 8k context. The inputs are kept by `Record` in the search's state and saved at each
checkpoint, so that a resumed search writes the same prompts and replays its transcript.
"""

from __future__ import annotations

import numpy as np

from .allocation import LLM_CROSSOVER, LLM_MUTATION

ITEMS = ("calibration", "correlations", "feedback")
MIN_EVALUATIONS = 8  # fewer full evaluations say nothing reliable about 30 positions


class Record:
    """What the evidence is made of, kept only where asked for (state.json stays as it was without):
    [units, fitness] of every full evaluation, and the fate of each LLM crossover and mutation of the
    generation under way and of the last one."""

    def __init__(self, items):
        self.items = tuple(items)
        self.evaluated: list[list] = []
        self.fates: list[dict] = []

    def note(self, req, entered: bool, fitness: float | None, generation: int) -> None:
        """An evaluation request's fate (Evolution._settle): fitness None when screened out or failed."""
        if fitness is not None and "correlations" in self.items:
            self.evaluated.append([[int(u) for u in req.units], fitness])
        kind = "crossover" if LLM_CROSSOVER in req.arms else "mutation" if LLM_MUTATION in req.arms else None
        if kind and "feedback" in self.items:
            self.fates = [f for f in self.fates if f["generation"] == generation]
            self.fates.append({"generation": generation, "kind": kind, "fitness": fitness,
                               "parent": req.parent_fitness, "entered": entered})

    def state(self) -> dict:
        return {k: v for k, v in (("evaluated", self.evaluated), ("fates", self.fates)) if v}

    def load(self, extra: dict) -> None:
        self.evaluated = [list(e) for e in extra.get("evaluated", [])]
        self.fates = [dict(f) for f in extra.get("fates", [])]


def texts(items, strategy, label: str, digits: str) -> dict[str, str]:
    """The template values `calibration`, `correlations` and `feedback` for the prompts written now."""
    space, record = strategy.ctx.space, strategy.record
    last = [f for f in record.fates if f["generation"] == strategy.generation - 1]
    return {"calibration": calibration(strategy.ctx.prior) if "calibration" in items else "",
            "correlations": (correlations(record.evaluated, space.num_blocks if space.separate else None, label)
                             if "correlations" in items else ""),
            "feedback": feedback(last, label, digits) if "feedback" in items else ""}


def _layout(values: list[str], blocks: int | None) -> str:
    """Values in the candidates' layout: a list, or attention and MLP lists of `blocks` each."""
    if blocks is None:
        return "[" + ",".join(values) + "]"
    return '{"attention":[' + ",".join(values[:blocks]) + '],"mlp":[' + ",".join(values[blocks:]) + "]}"


def calibration(prior: dict | None) -> str:
    if not prior or prior.get("outlier_ratio") is None:
        return ""
    outliers = _layout([f"{o * 100:.2f}" for o in prior["outlier_ratio"]], None)
    sizes = _layout([f"{r:.2f}" for r in prior["relative_activation"]], None)
    return (f"Calibration statistics per block, from block 0 on (a higher outlier ratio or activation size usually "
            f"means the block matters more and should be pruned less): outlier ratio in percent {outliers}; "
            f"relative activation size {sizes}\n\n")


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties sharing their mean rank (as scipy.stats.rankdata's 'average')."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=r) / counts)[inverse]


def spearman(x, y) -> float | None:
    """Spearman's rank correlation; None where either side does not vary."""
    rx, ry = ranks(np.asarray(x, dtype=float)), ranks(np.asarray(y, dtype=float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    norm = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / norm) if norm > 0 else None


def correlations(evaluated: list, blocks: int | None, label: str) -> str:
    """`evaluated`: [units, fitness] of every full evaluation so far; `blocks`: attention and MLP
    rates of that many blocks each (None: one rate per block)."""
    if len(evaluated) < MIN_EVALUATIONS:
        return ""
    units = np.array([u for u, _ in evaluated], dtype=float)  # (evaluations, positions)
    fitness = [f for _, f in evaluated]
    rho = [spearman(units[:, p], fitness) for p in range(units.shape[1])]
    values = _layout(["null" if r is None else f"{r:.2f}" for r in rho], blocks)
    return (f"What the {len(evaluated)} candidates evaluated so far say about each position: the rank correlation of "
            f"its rate with {label}, in the candidates' layout (positive: pruning more there went with worse, "
            f"higher {label}; negative: pruning more there did no harm; near 0: no clear effect; null: the rate "
            f"never varied): {values}\n\n")


def feedback(fates: list[dict], label: str, digits: str) -> str:
    """`fates`: the LLM's crossovers and mutations of the last generation, each a dict of kind,
    fitness (None: screened out or failed), parent (the better parent's fitness) and entered."""
    if not fates:
        return ""
    lines, changes = [], []
    for kind in ("crossover", "mutation"):
        mine = sorted((f for f in fates if f["kind"] == kind),
                      key=lambda f: float("inf") if f["fitness"] is None else f["fitness"])
        for i, f in enumerate(mine):
            if f["fitness"] is None:
                lines.append(f"- {kind} {i + 1}: not evaluated in full (screened out or failed), better parent "
                             f"{f['parent']:{digits}}, not entered")
                continue
            change = (f["fitness"] - f["parent"]) / f["parent"] * 100 if f["parent"] else 0.0
            changes.append(change)
            lines.append(f"- {kind} {i + 1}: {f['fitness']:{digits}} vs better parent {f['parent']:{digits}} "
                         f"({change:+.2f} %), {'entered' if f['entered'] else 'not entered'}")
    entered = sum(f["entered"] for f in fates)
    mean = f"; mean change of {label} against the better parent {np.mean(changes):+.2f} %" if changes else ""
    return (f"What your own crossovers and mutations of the last generation scored ({label}, lower is better):\n"
            + "\n".join(lines) + f"\nIn all, {entered} of {len(fates)} entered the population{mean}.\n\n")
