"""How a search's result reads: the LLM and per-origin summaries, the plots, the summary table."""

from __future__ import annotations

import math
from pathlib import Path

from .allocation import GROUPS
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
        # repeats of a candidate already evaluated: asked for again once, then replaced if still not new
        "offspring_duplicates": counters.get("llm_duplicates", 0),
        "offspring_new_when_asked_again": counters.get("llm_new_when_asked_again", 0),
        "offspring_duplicates_kept": counters.get("llm_duplicates_kept", 0),
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
    metric = (result.get("fitness_text") or {}).get("metric", "perplexity")
    ax.set_ylabel(f"fitness ({'KL divergence from dense' if metric == 'kl' else 'perplexity'}, lower is better)")
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


def shares_line(generations: list[dict]) -> str | None:
    """How the offspring slots were shared between the LLM's operators and the classical ones,
    in the first and the last generation that shared them, so that whether the LLM earned its
    place or was pushed down to the floor reads at a glance. None where no generation shared any
    (genetic, or llm-evolution stopped before its first offspring)."""
    shared = [g for g in generations if g.get("shares")]
    if not shared:
        return None
    ends = shared[:1] if len(shared) == 1 else [shared[0], shared[-1]]

    def group(name: str) -> str:
        return " -> ".join("/".join(str(g["shares"].get(arm, 0)) for arm in GROUPS[name]) for g in ends)

    span = " -> ".join(str(g["generation"]) for g in ends)
    return (f"offspring shares LLM/classical, generation {span}: crossover {group('crossover')}, "
            f"mutation {group('mutation')}; LLM offspring's parents by LLM selection/tournament {group('selection')}")


def summary_table(result: dict) -> str:
    rows = [("dense", result["dense"])]
    rows += [(name, b) for name, b in result["baselines"].items()]
    rows += [(f"searched ({result['strategy']})", result["best"])]
    metric = (result.get("fitness_text") or {}).get("metric", "perplexity")
    texts = result.get("held_out_texts") or [result.get("held_out_text") or {}]
    header = f"{'allocation':<28}{'fitness KL' if metric == 'kl' else 'fitness ppl':>12}"
    if len(texts) == 1:
        header += f"{'held-out ppl':>14}"
    else:  # one column per domain, then their geometric mean; the texts are named below the table
        header += "".join(f"{f'held-out {i + 1}':>12}" for i in range(len(texts))) + f"{'geo-mean':>10}"
    lines = [header]
    for name, r in rows:
        line = f"{name:<28}{_num(r.get('fitness')):>12}"
        if len(texts) == 1:
            line += f"{_num(r.get('held_out_perplexity')):>14}"
        else:
            line += "".join(f"{_num(p):>12}" for p in r.get("held_out_perplexities") or [None] * len(texts))
            line += f"{_num(r.get('held_out_geometric_mean')):>10}"
        lines.append(line)
    for i, held in enumerate(texts):
        if len(texts) > 1:
            lines.append(f"held-out {i + 1}: {held.get('text')}")
        if held.get("whole_text"):  # asked for more than the text holds: say what the numbers rest on
            lines.append(f"held-out text {held['text']}: {held['tokens']} tokens scored, all it holds "
                         f"(heldOutTokens asked {held['tokens_asked']})")
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
    shares = shares_line(result.get("generations") or [])
    if shares:
        lines.append(shares)
    if result.get("origins"):
        lines.append("")
        lines.append(f"{'origin':<28}{'made':>6}{'entered':>9}{'vs parent':>11}")
        for name, o in result["origins"].items():
            imp = o["mean_improvement_over_parent"]
            lines.append(f"{name:<28}{o['made']:>6}{o['entered_share'] * 100:>8.0f}%"
                         f"{'-' if imp is None else f'{imp * 100:+.1f}%':>11}")
    zs = result.get("zero_shot") or {}
    if zs.get("table"):
        from ..zero_shot import markdown

        limit = zs["table"].get("limit")
        lines += ["", "zero-shot accuracy (%)" + (f", first {limit} documents per task" if limit else "") + ":",
                  markdown(zs["table"])]
    elif zs.get("error"):
        lines += ["", zs["error"]]
    if result.get("checkpoint"):
        lines.append(f"checkpoint: {result['checkpoint']}")
    return "\n".join(lines)


def _num(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
