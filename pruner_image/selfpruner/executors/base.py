"""The executor interface the search loop talks to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class EvalTask:
    rates: dict | list  # Rates.to_json()
    tokens: int  # fidelity; 0 means the whole text
    text: str = "fitness"  # or a held-out text's label: "heldout", "heldout-2", ... (for_spec.held_out_texts)
    # None: the fixed windows (the first that fit `tokens`); a number: windows drawn afresh from the
    # whole text with this seed (evaluate.select_windows), the same on every machine
    sample: int | None = None


@dataclass
class EvalOutcome:
    fitness: float | None  # perplexity on the task's text, or (fitness.metric kl) mean KL from the dense model
    tokens: int  # tokens predicted
    seconds: float  # device time
    achieved_ratio: float | None = None
    error: str | None = None


class Executor(Protocol):
    geometry: object  # architecture.Geometry of the model being pruned
    prior: dict  # prior.block_statistics
    memory_plan: dict | None  # memory_plan.MemoryPlan.to_dict() of a worker, with its devices; None: not known

    def evaluate(self, tasks: list[EvalTask], on_result=None) -> list[EvalOutcome]:
        """Outcomes in task order; `on_result(i, outcome)` is called as each one finishes,
        so the caller can record it before the next (nothing is lost to a crash)."""
        ...

    def finalize(self, rates: dict | list, out_dir: str | None, info: dict,
                 zero_shot_request: dict | None = None) -> dict:
        """Export `rates` into `out_dir` (None: no checkpoint) and run the zero-shot tasks
        (`zero_shot.request`); returns {"checkpoint": path or URI or None, "zero_shot": {...}}."""
        ...
