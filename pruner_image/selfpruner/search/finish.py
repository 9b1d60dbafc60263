"""The last step of a search: the best candidate and the baselines measured on the held-out text,
the checkpoint exported, zero-shot tasks run, and `result.json` and the plots written."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .. import zero_shot as zs
from ..executors.for_spec import held_out_texts
from ..structure import Rates
from .baselines import Owl, Uniform
from .report import llm_summary, origin_table, plot


def _baseline_units(name: str, strategy):
    cls = {"uniform": Uniform, "owl": Owl}[name]
    return cls(strategy.ctx).allocation()


def _read_whole(scored: int | None, asked: int, seq_len: int) -> bool:
    """Whether an evaluation that predicted `scored` tokens ran out of text before the `asked`
    tokens: a text that holds them gives (asked // L) windows of L, each predicting L - 1."""
    length = min(seq_len, asked)
    return scored is not None and scored < (asked // length) * (length - 1)


def geometric_mean(values: list) -> float | None:
    """Over held-out texts of several domains: a perplexity ratio counts the same on every text,
    so an easy text (low perplexity) does not drown out a hard one. None when one is missing."""
    if not values or any(v is None or not v > 0 or math.isinf(v) for v in values):
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _held_out(row: dict) -> dict:
    """A result row's held-out figures: the first text's perplexity (`held_out_perplexity`, what
    status and the metrics show), every text's in spec order, and their geometric mean."""
    return {"held_out_perplexity": row["held_out"][0], "held_out_perplexities": row["held_out"],
            "held_out_geometric_mean": geometric_mean(row["held_out"])}


def _text_record(source: str, scored: int | None, f) -> dict:
    return {"text": source, "tokens": scored, "tokens_asked": f.held_out_tokens,
            "whole_text": _read_whole(scored, f.held_out_tokens, f.seq_len)}


def finish(spec, out: Path, strategy, space, evaluator, executor, transcript, wall_seconds: float) -> dict:
    f = spec.spec.fitness
    best = strategy.best()
    candidates = {"best": space.to_rates(best.units).to_json()}
    for name in spec.spec.search.baselines:
        candidates[name] = space.to_rates(_baseline_units(name, strategy)).to_json()
    dense = Rates.uniform(0.0, executor.geometry.num_layers).to_json()
    items = [(dense, f.tokens, "fitness", "dense")]
    items += [(r, f.tokens, "fitness", name) for name, r in candidates.items()]
    held = held_out_texts(f)
    for label, _, _ in held:
        items += [(dense, f.held_out_tokens, label, "dense")]
        items += [(r, f.held_out_tokens, label, name) for name, r in candidates.items()]
    entries = evaluator.run([(r, t, x, f"report:{n}", None) for r, t, x, n in items], generation=strategy.generation)
    numbers: dict[str, dict] = {}
    scored = {}  # tokens each text's evaluation predicted: a text shorter than asked gives fewer
    for (rates, tokens, text, name), (entry, _) in zip(items, entries):
        numbers.setdefault(name, {"rates": rates})[text] = entry["fitness"]
        numbers[name]["achieved_ratio"] = entry.get("achieved_ratio")
        if name == "dense" and entry.get("fitness") is not None:
            scored[text] = entry.get("tokens")
    for row in numbers.values():
        row["held_out"] = [row.get(label) for label, _, _ in held]
    checkpoint, zero_shot = None, {}
    search = spec.spec.search
    request = None
    if search.zero_shot_tasks:
        named = {"dense": dense, **candidates}
        request = zs.request(search.zero_shot_tasks, named, limit=search.get("zeroShotLimit"),
                             batch_size=search.get("zeroShotBatchSize") or 8)
    if spec.spec.output.export or request:
        info = {"source_model": spec.spec.model.source, "rates": candidates["best"],
                "metric": spec.spec.pruning.metric, "fitness": numbers["best"]["fitness"],
                "held_out_perplexity": numbers["best"]["heldout"], "prunejob": spec.metadata.get("name")}
        out_dir = str(out / "checkpoint") if spec.spec.output.export else None
        done = executor.finalize(candidates["best"], out_dir, info, request)
        checkpoint, zero_shot = done["checkpoint"], done["zero_shot"]
    counters = strategy.counters
    llm = llm_summary(transcript, counters, strategy.projection) if transcript else None
    result = {
        "prunejob": spec.metadata.get("name"),
        "strategy": strategy.name,
        "target_ratio": space.ratio,
        "best": {"rates": candidates["best"], "fitness": numbers["best"]["fitness"],
                 **_held_out(numbers["best"]),
                 "achieved_ratio": numbers["best"]["achieved_ratio"], "origin": best.origin},
        "dense": {"fitness": numbers["dense"]["fitness"], **_held_out(numbers["dense"])},
        "baselines": {name: {"fitness": numbers[name]["fitness"], **_held_out(numbers[name]),
                             "achieved_ratio": numbers[name]["achieved_ratio"], "rates": numbers[name]["rates"]}
                      for name in spec.spec.search.baselines},
        "fitness_text": {"text": f.text, "tokens": scored.get("fitness"), "tokens_asked": f.tokens,
                         "metric": f.metric, **({"top_k": f.top_k} if f.metric == "kl" else {})},
        "held_out_text": _text_record(f.held_out_text, scored.get("heldout"), f),
        "held_out_texts": [_text_record(source, scored.get(label), f) for label, source, _ in held],
        "best_per_generation": strategy.best_per_generation,
        "generations": strategy.generation_log,
        "origins": origin_table(strategy.origins),
        "cost": {"wall_seconds": round(wall_seconds, 2), **evaluator.history.totals(),
                 "budget_full_evaluations": strategy.ctx.budget, "budget_spent": round(strategy.spent, 3),
                 "llm": llm},
        "counters": counters,
        "checkpoint": checkpoint,
        "zero_shot": zero_shot,
        "memory_plan": getattr(executor, "memory_plan", None),
    }
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out / "result.json")
    plot(result, out, executor.geometry.num_layers, space.separate)
    return result
