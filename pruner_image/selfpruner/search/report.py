"""What a search leaves behind: held-out numbers, result.json, plots, a summary table."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..structure import Rates
from .baselines import Owl, Uniform
from .llm_clients import totals


class Progress:
    def __init__(self, budget: float, strategy, enabled: bool = True):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=round(budget, 2), desc=f"search ({strategy.name})", unit="eval")
        self.done = 0.0

    def update(self, strategy) -> None:
        if self.bar is None:
            return
        self.bar.update(round(strategy.spent - self.done, 3))
        self.done = strategy.spent
        best = strategy.best()
        self.bar.set_postfix(generation=strategy.generation, best=f"{best.fitness:.3f}" if best else "-")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _baseline_units(name: str, strategy):
    cls = {"uniform": Uniform, "owl": Owl}[name]
    return cls(strategy.ctx).allocation()


def finish(spec, out: Path, strategy, space, evaluator, executor, transcript, wall_seconds: float) -> dict:
    f = spec.spec.fitness
    best = strategy.best()
    candidates = {"best": space.to_rates(best.units).to_json()}
    for name in spec.spec.search.baselines:
        candidates[name] = space.to_rates(_baseline_units(name, strategy)).to_json()
    dense = Rates.uniform(0.0, executor.geometry.num_layers).to_json()
    items = [(dense, f.tokens, "fitness", "dense")]
    items += [(r, f.tokens, "fitness", name) for name, r in candidates.items()]
    items += [(dense, f.held_out_tokens, "heldout", "dense")]
    items += [(r, f.held_out_tokens, "heldout", name) for name, r in candidates.items()]
    entries = evaluator.run([(r, t, x, f"report:{n}") for r, t, x, n in items], generation=strategy.generation)
    numbers: dict[str, dict] = {}
    for (rates, tokens, text, name), (entry, _) in zip(items, entries):
        numbers.setdefault(name, {"rates": rates})[text] = entry["fitness"]
        numbers[name]["achieved_ratio"] = entry.get("achieved_ratio")
    checkpoint = None
    if spec.spec.output.export:
        info = {"source_model": spec.spec.model.source, "rates": candidates["best"],
                "metric": spec.spec.pruning.metric, "fitness": numbers["best"]["fitness"],
                "held_out_perplexity": numbers["best"]["heldout"], "prunejob": spec.metadata.get("name")}
        checkpoint = executor.export(candidates["best"], str(out / "checkpoint"), info)
    zero_shot = {}
    if spec.spec.search.zero_shot_tasks:
        from . import zero_shot as zs

        if checkpoint is None:
            zero_shot = {"skipped": "spec.output.export is false: there is no checkpoint to evaluate"}
        else:
            zero_shot = zs.run(checkpoint, spec.spec.search.zero_shot_tasks, dtype=spec.spec.model.dtype)
    counters = strategy.counters
    llm = llm_summary(transcript, counters, strategy.projection) if transcript else None
    result = {
        "prunejob": spec.metadata.get("name"),
        "strategy": strategy.name,
        "target_ratio": space.ratio,
        "best": {"rates": candidates["best"], "fitness": numbers["best"]["fitness"],
                 "held_out_perplexity": numbers["best"]["heldout"],
                 "achieved_ratio": numbers["best"]["achieved_ratio"], "origin": best.origin},
        "dense": {"fitness": numbers["dense"]["fitness"], "held_out_perplexity": numbers["dense"]["heldout"]},
        "baselines": {name: {"fitness": numbers[name]["fitness"], "held_out_perplexity": numbers[name]["heldout"],
                             "achieved_ratio": numbers[name]["achieved_ratio"], "rates": numbers[name]["rates"]}
                      for name in spec.spec.search.baselines},
        "fitness_text": {"text": spec.spec.fitness.text, "tokens": spec.spec.fitness.tokens},
        "held_out_text": {"text": spec.spec.fitness.held_out_text, "tokens": spec.spec.fitness.held_out_tokens},
        "best_per_generation": strategy.best_per_generation,
        "generations": strategy.generation_log,
        "origins": origin_table(strategy.origins),
        "cost": {"wall_seconds": round(wall_seconds, 2), **evaluator.history.totals(),
                 "budget_full_evaluations": strategy.ctx.budget, "budget_spent": round(strategy.spent, 3),
                 "llm": llm},
        "counters": counters,
        "checkpoint": checkpoint,
        "zero_shot": zero_shot,
    }
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out / "result.json")
    plot(result, out, executor.geometry.num_layers, space.separate)
    return result


def llm_summary(transcript, counters: dict, projection: dict) -> dict:
    """What the LLM cost and how much of what it wrote was used as written."""
    llm = totals(transcript)
    asked = counters.get("llm_offspring_asked", 0)
    used = counters.get("llm_used", 0)
    llm.update({
        "offspring_asked": asked,
        "offspring_used": used,  # valid as written (shape, bounds, grid) and new
        "offspring_used_as_written": counters.get("llm_as_written", 0),
        "offspring_repaired": counters.get("llm_repaired", 0),
        "offspring_duplicates": counters.get("llm_duplicates", 0),
        "offspring_replaced": counters.get("llm_replaced", 0),
        "used_share": used / asked if asked else None,
        "as_written_share": counters.get("llm_as_written", 0) / asked if asked else None,
        "unparseable_replies": counters.get("llm_unparseable_replies", 0),
        "selections": counters.get("llm_selections", 0),
        "selections_repaired": counters.get("llm_selection_repaired", 0),
        # projection fixes only the mean: how far it moved a candidate, mean |Δrate| over blocks
        "projection_mean_abs_change": round(projection["sum"] / projection["n"], 5) if projection["n"] else None,
        "projection_max_abs_change": round(projection["max"], 5) if projection["n"] else None,
    })
    return llm


def origin_table(origins: dict) -> dict:
    """Per origin: offspring made, the share that entered the next population, and the mean
    relative improvement of their fitness over the better parent (positive: better)."""
    table = {}
    for name in sorted(origins):
        o = origins[name]
        table[name] = {"made": o["made"], "entered": o["entered"],
                       "entered_share": round(o["entered"] / o["made"], 4) if o["made"] else None,
                       "mean_improvement_over_parent": (round(o["improvement_sum"] / o["improvement_n"], 5)
                                                        if o["improvement_n"] else None)}
    return table


def plot(result: dict, out: Path, num_blocks: int, separate: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    best = result["best_per_generation"]
    ax.plot(range(len(best)), best, marker="o", label=f"best ({result['strategy']})")
    for name, colour in (("uniform", "tab:red"), ("owl", "tab:green")):
        if name in result["baselines"] and result["baselines"][name]["fitness"] is not None:
            ax.axhline(result["baselines"][name]["fitness"], color=colour, linestyle="--", label=name)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (perplexity, lower is better)")
    ax.set_title(f"{result['prunejob']}: best fitness per generation (ratio {result['target_ratio']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fitness.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(7, num_blocks * 0.3), 4))
    def series(rates):
        return (rates["attention"], rates["mlp"]) if isinstance(rates, dict) else (rates, None)
    a, m = series(result["best"]["rates"])
    x = list(range(num_blocks))
    ax.bar(x, a, width=0.8 if m is None else 0.4, label="searched" if m is None else "searched: attention")
    if m is not None:
        ax.bar([i + 0.4 for i in x], m, width=0.4, label="searched: MLP")
    ax.axhline(result["target_ratio"], color="tab:red", linestyle="--", label="uniform")
    ax.set_xlabel("block")
    ax.set_ylabel("pruning rate")
    ax.set_title("per-block pruning rates")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rates.png", dpi=100)
    plt.close(fig)


def summary_table(result: dict) -> str:
    rows = [("dense", result["dense"])]
    rows += [(name, b) for name, b in result["baselines"].items()]
    rows += [(f"searched ({result['strategy']})", result["best"])]
    lines = [f"{'allocation':<28}{'fitness ppl':>12}{'held-out ppl':>14}"]
    for name, r in rows:
        fit = r.get("fitness")
        held = r.get("held_out_perplexity")
        lines.append(f"{name:<28}{_num(fit):>12}{_num(held):>14}")
    c = result["cost"]
    lines.append("")
    lines.append(f"cost: {c['evaluations']} evaluations, {c['tokens_evaluated']} tokens, "
                 f"{c['device_seconds']:.1f} device-s, {c['wall_seconds']:.1f} s wall")
    if c.get("llm"):
        l = c["llm"]
        share = l["used_share"]
        lines.append(f"LLM: {l['calls']} calls in {l['batches']} batches, {l['seconds']:.1f} s ({l['failed_calls']} failed), "
                     f"{l['prompt_tokens']} prompt + {l['completion_tokens']} completion tokens; offspring used as "
                     f"written: {'-' if share is None else f'{share * 100:.0f}%'} of {l['offspring_asked']}")
    if result.get("origins"):
        lines.append("")
        lines.append(f"{'origin':<28}{'made':>6}{'entered':>9}{'vs parent':>11}")
        for name, o in result["origins"].items():
            imp = o["mean_improvement_over_parent"]
            lines.append(f"{name:<28}{o['made']:>6}{o['entered_share'] * 100:>8.0f}%"
                         f"{'-' if imp is None else f'{imp * 100:+.1f}%':>11}")
    if result.get("checkpoint"):
        lines.append(f"checkpoint: {result['checkpoint']}")
    return "\n".join(lines)


def _num(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
