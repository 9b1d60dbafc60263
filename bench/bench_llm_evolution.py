"""Does the LLM earn its cost? llm-evolution with several local LLMs against genetic and
random at the paper's budget (430 evaluations), several seeds, held-out perplexity.

Why: before constrained decoding the demo model wrote 3 of 330 offspring usable as
written, so every "llm-evolution" result was the classical GA with another random stream.
This measures, per run: the share of LLM offspring used (valid as written and new), the
replies that could not be parsed, how far projection moved an LLM candidate (it fixes
only the mean), LLM seconds against evaluation seconds per generation, and the per-origin
table (made, entered the population, improvement over the better parent). Across seeds it
compares the mean best fitness of llm-evolution and genetic, and the entered share of LLM
offspring with that of classical ones.

    # GPU (bench/llm_evolution_on_device.sh runs this as parallel processes)
    PYTHONPATH=pruner_image python3 bench/bench_llm_evolution.py --model M.gguf \
        --llm smollm2=M.gguf,qwen05=Q.gguf --ratios 0.3,0.5 --seeds 0,1,2 --out llm.json
    # CPU smoke test: tiny random Llama, the demo model as the LLM, a tiny budget
    PYTHONPATH=pruner_image .venv/bin/python bench/bench_llm_evolution.py --tiny
    # what each item of llm.evidence adds (one variant each: none is the prompts measured so far)
    ... --strategies llm-evolution \
        --evidence none,calibration,calibration+correlations,calibration+correlations+feedback
    # the table from run folders only (no GPU)
    PYTHONPATH=pruner_image python3 bench/bench_llm_evolution.py --report-only --workdir W ...

GGUF inputs other than the demo are benchmark inputs only: `--sha256 NAME=HEX` refuses a file
whose checksum differs. Rerunning with the same --workdir resumes unfinished runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_search import goal_checker, sources  # noqa: E402  (the same tiny model, texts and verdicts)
from matrix import llm_shares  # noqa: E402

LLM_ORIGINS = ("llm-initial", "llm-crossover", "llm-mutation")
CLASSICAL_OFFSPRING = ("crossover", "mutation")  # genetic's offspring


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="the model being pruned: demo, a .gguf file or a HF folder")
    p.add_argument("--llm", default="smollm2=demo", help="NAME=SOURCE,...: the LLMs of llm-evolution")
    p.add_argument("--sha256", default="", help="NAME=HEX,...: checksums the LLM files must have")
    p.add_argument("--ratios", default="0.3,0.5")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--strategies", default="genetic,random,llm-evolution")
    p.add_argument("--selection", default="llm", help="llm, tournament or both (llm-evolution's parents)")
    p.add_argument("--operators", default="whole", help="whole, edits or both (llm-evolution's offspring)")
    p.add_argument("--allocation", default="adaptive",
                   help="adaptive (the default: operators share the offspring by success), fixed (the paper's: "
                        "every offspring the LLM's) or both")
    p.add_argument("--evidence", default="none",
                   help="VARIANT,...: llm.evidence of llm-evolution, one run each; a variant is none or items joined "
                        "by + (calibration+correlations+feedback)")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--held-out-tokens", type=int, default=32768)
    p.add_argument("--calibration-windows", type=int, default=32)
    p.add_argument("--max-rate", type=float, default=0.8)
    p.add_argument("--population", type=int, default=30)
    p.add_argument("--generations", type=int, default=20)
    p.add_argument("--offspring", type=int, default=10, help="crossovers and mutations per generation, each")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--workdir", default="runs/bench_llm_evolution")
    p.add_argument("--out", default=None, help="JSON of every run, the aggregates and the goal checks")
    p.add_argument("--report-only", action="store_true", help="evaluate nothing: report the finished runs")
    p.add_argument("--plot", default=None, help="PNG: held-out perplexity, and the share of offspring entering the "
                                                "population by origin")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama, random texts, tiny budget (CPU)")
    a = p.parse_args(argv)
    if a.tiny:
        a.tokens, a.seq_len, a.held_out_tokens, a.calibration_windows = 512, 128, 1024, 4
        a.population, a.generations, a.offspring = 4, 2, 2
        a.seeds = a.seeds if a.seeds != "0,1,2" else "0"
    a.workdir = Path(a.workdir + ("_tiny" if a.tiny else ""))
    return a


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def job(a, src: dict, ratio: float, strategy: str, seed: int, llm_source: str, selection: bool, operators: str,
        out: Path, allocation: str = "adaptive", evidence: str = "none") -> dict:
    spec = {"model": {"source": src["model"]},
            "target": {"ratio": ratio, "minRate": 0.0, "maxRate": a.max_rate},
            "pruning": {"metric": "wanda-sp", "biasCompensation": True},
            "calibration": {"text": src["calibration"], "windows": a.calibration_windows, "seqLen": a.seq_len},
            "fitness": {"text": src["fitness"], "seqLen": a.seq_len, "tokens": a.tokens, "batchSize": a.batch_size,
                        "heldOutText": src["heldout"], "heldOutTokens": a.held_out_tokens},
            "search": {"strategy": strategy, "population": a.population, "generations": a.generations,
                       "crossovers": a.offspring, "mutations": a.offspring, "seed": seed, "baselines": ["uniform"]},
            "llm": {"provider": "local", "model": llm_source, "temperature": a.temperature, "seed": seed,
                    "selection": selection, "operators": operators, "allocation": allocation,
                    "evidence": evidence_items(evidence)},
            "output": {"path": str(out), "export": False}}
    return {"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob",
            "metadata": {"name": f"bench-{strategy}"}, "spec": spec}


def evidence_items(variant: str) -> list[str]:
    return [] if variant in ("none", "") else variant.split("+")


def plan(a) -> list[dict]:
    llms = dict(item.split("=", 1) for item in a.llm.split(",") if item)
    selections = {"llm": [True], "tournament": [False], "both": [True, False]}[a.selection]
    operator_modes = {"whole": ["whole"], "edits": ["edits"], "both": ["whole", "edits"]}[a.operators]
    allocations = {"adaptive": ["adaptive"], "fixed": ["fixed"], "both": ["adaptive", "fixed"]}[a.allocation]
    runs = []
    for ratio in [float(r) for r in a.ratios.split(",")]:
        for seed in [int(s) for s in a.seeds.split(",")]:
            for strategy in a.strategies.split(","):
                if strategy != "llm-evolution":
                    runs.append({"ratio": ratio, "seed": seed, "strategy": strategy, "llm": None, "selection": None,
                                 "operators": None, "allocation": None, "evidence": None})
                    continue
                for name, source in llms.items():
                    for sel in selections:
                        for ops in operator_modes:
                            for alloc in allocations:
                                for ev in a.evidence.split(","):
                                    runs.append({"ratio": ratio, "seed": seed, "strategy": strategy, "llm": name,
                                                 "llm_source": source, "selection": sel, "operators": ops,
                                                 "allocation": alloc, "evidence": ev})
    return runs


def label(run: dict) -> str:
    if run["strategy"] != "llm-evolution":
        return run["strategy"]
    extra = ("" if run["selection"] else ", tournament") + ("" if run["operators"] == "whole" else ", edits") + \
        (", fixed" if run.get("allocation") == "fixed" else "") + \
        (f", {run['evidence']}" if run.get("evidence") not in (None, "none") else "")
    for item, short in (("calibration", "cal"), ("correlations", "corr"), ("feedback", "fb")):  # the table's width
        extra = extra.replace(item, short)
    return f"llm-evolution[{run['llm']}{extra}]"


def summarize(run: dict, result: dict) -> dict:
    gens = result.get("generations", [])
    later = [g for g in gens if g["generation"] >= 1]
    llm = result["cost"].get("llm") or {}
    row = {**{k: v for k, v in run.items() if k != "llm_source"}, "label": label(run),
           "best_fitness": result["best"]["fitness"], "held_out": result["best"]["held_out_perplexity"],
           "uniform_held_out": result["baselines"]["uniform"]["held_out_perplexity"],
           "dense_held_out": result["dense"]["held_out_perplexity"], "evaluations": result["cost"]["evaluations"],
           "wall_seconds": result["cost"]["wall_seconds"], "origins": result.get("origins", {}),
           "best_per_generation": result["best_per_generation"],
           "evaluation_seconds_per_generation": (round(statistics.mean(g["evaluation_seconds"] for g in later), 2)
                                                 if later else None)}
    if llm:
        row.update({"llm_calls": llm["calls"], "llm_batches": llm["batches"], "llm_seconds": llm["seconds"],
                    "llm_seconds_initial": gens[0]["llm_seconds"] if gens else None,
                    "llm_seconds_per_generation": (round(statistics.mean(g["llm_seconds"] for g in later), 2)
                                                   if later else None),
                    "llm_completion_tokens": llm["completion_tokens"], "offspring_asked": llm["offspring_asked"],
                    "used_share": llm["used_share"], "unparseable_replies": llm["unparseable_replies"],
                    "offspring_replaced": llm["offspring_replaced"], "selections_repaired": llm["selections_repaired"],
                    "projection_mean_abs_change": llm["projection_mean_abs_change"],
                    "offspring_duplicates": llm["offspring_duplicates"],
                    "offspring_new_when_asked_again": llm.get("offspring_new_when_asked_again", 0),
                    "llm_share_per_generation": llm_shares(gens)})
    return row


def entered_share(rows: list[dict], origins) -> float | None:
    made = sum(r["origins"].get(o, {}).get("made", 0) for r in rows for o in origins)
    entered = sum(r["origins"].get(o, {}).get("entered", 0) for r in rows for o in origins)
    return entered / made if made else None


def aggregate(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["ratio"], r["label"]), []).append(r)
    out = []
    for (ratio, name), rs in sorted(groups.items()):
        fit = [r["best_fitness"] for r in rs]
        held = [r["held_out"] for r in rs]
        g = {"ratio": ratio, "label": name, "seeds": len(rs), "best_fitness_mean": statistics.mean(fit),
             "best_fitness_sd": statistics.pstdev(fit), "held_out_mean": statistics.mean(held),
             "held_out_sd": statistics.pstdev(held), "uniform_held_out": rs[0]["uniform_held_out"],
             "dense_held_out": rs[0]["dense_held_out"]}
        if "used_share" in rs[0]:
            asked = sum(r["offspring_asked"] for r in rs)
            g.update({"used_share": sum(r["used_share"] * r["offspring_asked"] for r in rs) / asked,
                      "unparseable_replies": sum(r["unparseable_replies"] for r in rs),
                      "llm_seconds_per_generation": statistics.mean(r["llm_seconds_per_generation"] for r in rs),
                      "evaluation_seconds_per_generation": statistics.mean(
                          r["evaluation_seconds_per_generation"] for r in rs),
                      "projection_mean_abs_change": statistics.mean(r["projection_mean_abs_change"] for r in rs),
                      "llm_entered_share": entered_share(rs, ("llm-crossover", "llm-mutation")),
                      "classical_fallback_entered_share": entered_share(rs, ("classical",))})
        if name == "genetic":
            g["classical_entered_share"] = entered_share(rs, CLASSICAL_OFFSPRING)
        out.append(g)
    return out


def goals(groups: list[dict]) -> list[dict]:
    checks, check = goal_checker()

    print("\nGoal 1: >= 95 % of LLM offspring used, no unparseable reply (per LLM and β)")
    for g in groups:
        if "used_share" in g:
            check(1, g["used_share"] >= 0.95 and g["unparseable_replies"] == 0,
                  f"β={g['ratio']} {g['label']}: used {g['used_share']:.1%}, {g['unparseable_replies']} unparseable, "
                  f"projection moves a rate by {g['projection_mean_abs_change']:.4f} on average")
    print("\nGoal 2: LLM seconds per generation <= 14 (a 7B generation's evaluations cost 28.4 s)")
    for g in groups:
        if "used_share" in g:
            check(2, g["llm_seconds_per_generation"] <= 14,
                  f"β={g['ratio']} {g['label']}: {g['llm_seconds_per_generation']:.1f} s LLM vs "
                  f"{g['evaluation_seconds_per_generation']:.1f} s evaluation per generation")
    print("\nMoonshot: llm-evolution's mean best fitness <= genetic's; its offspring enter more often")
    by = {(g["ratio"], g["label"]): g for g in groups}
    for g in groups:
        gen = by.get((g["ratio"], "genetic"))
        if "used_share" in g and gen:
            check(3, g["best_fitness_mean"] <= gen["best_fitness_mean"],
                  f"β={g['ratio']} {g['label']}: best fitness {g['best_fitness_mean']:.2f} ± {g['best_fitness_sd']:.2f}"
                  f" vs genetic {gen['best_fitness_mean']:.2f} ± {gen['best_fitness_sd']:.2f}")
            ls, cs = g["llm_entered_share"], gen.get("classical_entered_share")
            if ls is not None and cs is not None:
                check(3, ls > cs, f"β={g['ratio']} {g['label']}: LLM offspring entered {ls:.1%} vs genetic's "
                                  f"classical offspring {cs:.1%}")
    return checks


def plot(rows: list[dict], groups: list[dict], path: str) -> None:
    """Left: held-out perplexity per strategy and β (mean over seeds, ±1 sd; uniform and dense as lines).
    Right: per origin, the share of offspring that entered the population, over every run at β = first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({g["ratio"] for g in groups})
    names = list(dict.fromkeys(g["label"] for g in groups))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs, ys, es = [], [], []
        for j, ratio in enumerate(ratios):
            g = next((g for g in groups if g["ratio"] == ratio and g["label"] == name), None)
            if g:
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(g["held_out_mean"])
                es.append(g["held_out_sd"])
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=f"{name}")
    for j, ratio in enumerate(ratios):
        g = next(g for g in groups if g["ratio"] == ratio)
        ax.hlines(g["uniform_held_out"], j - 0.45, j + 0.45, colors="tab:red", linestyles="--",
                  label="uniform" if j == 0 else None)
        ax.hlines(g["dense_held_out"], j - 0.45, j + 0.45, colors="black", label="dense" if j == 0 else None)
    ax.set_xticks(range(len(ratios)), [f"β = {r}" for r in ratios])
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_title("best candidate of each search (mean over seeds ± sd)")
    ax.legend(fontsize=7)
    first = [r for r in rows if r["ratio"] == ratios[0]]
    bars = {}
    for r in first:
        for origin, o in r["origins"].items():
            key = f"{r['label'].replace('llm-evolution', 'llm')}: {origin}"
            made, entered = bars.get(key, (0, 0))
            bars[key] = (made + o["made"], entered + o["entered"])
    keys = sorted(bars)
    bx.barh(range(len(keys)), [bars[k][1] / bars[k][0] for k in keys],
            color=["tab:blue" if ": llm-" in k else "tab:gray" for k in keys])
    bx.set_yticks(range(len(keys)), [f"{k} ({bars[k][0]})" for k in keys], fontsize=6)
    bx.set_xlabel(f"share entering the population (β = {ratios[0]}; offspring made in brackets)")
    bx.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    from selfpruner import spec as spec_mod
    from selfpruner.executors.for_spec import make_executor
    from selfpruner.search import runner
    from selfpruner.search.llm_clients import LocalChat

    a.workdir.mkdir(parents=True, exist_ok=True)
    src = sources(a)
    wanted = dict(item.split("=", 1) for item in a.sha256.split(",") if item)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    executor, clients, rows = None, {}, []
    for run in plan(a):
        doc = job(a, src, run["ratio"], run["strategy"], run["seed"], run.get("llm_source") or "demo",
                  bool(run["selection"]), run["operators"] or "whole", a.workdir, run["allocation"] or "adaptive",
                  run["evidence"] or "none")
        key = runner.spec_hash(spec_mod.parse(doc))
        out = a.workdir / f"r{run['ratio']}-s{run['seed']}-{label(run).replace('[', '-').replace(']', '')}-{key}"
        out = Path(str(out).replace(", ", "-").replace(" ", ""))
        done = (out / "result.json").is_file()
        if not done and a.report_only:
            print(f"not finished: {out.name}")
            continue
        if not done:
            spec = spec_mod.parse(job(a, src, run["ratio"], run["strategy"], run["seed"],
                                      run.get("llm_source") or "demo", bool(run["selection"]),
                                      run["operators"] or "whole", out, run["allocation"] or "adaptive",
                                      run["evidence"] or "none"))
            if executor is None:  # one pruned model, calibrated once, shared by every run
                executor = make_executor(spec, progress=False)
            client = None
            if run["strategy"] == "llm-evolution":
                name, source = run["llm"], run["llm_source"]
                if name not in clients:
                    if name in wanted and sha256(source) != wanted[name]:
                        raise SystemExit(f"{source}: sha256 differs from the one given for {name}; refusing it")
                    started = time.time()
                    clients[name] = LocalChat(source, temperature=a.temperature, device=device)
                    print(f"LLM {name} loaded in {time.time() - started:.1f} s", flush=True)
                client = clients[name]
                client.seed = run["seed"]
            print(f"run β={run['ratio']} seed {run['seed']} {label(run)} ...", flush=True)
            runner.run(spec, progress=False, out_dir=out, executor=executor, llm_client=client)
        rows.append(summarize(run, json.loads((out / "result.json").read_text())))

    groups = aggregate(rows)
    print(f"\n{'β':>4} {'strategy':<40}{'seeds':>6}{'best fitness':>16}{'held-out':>16}{'used':>7}"
          f"{'LLM s/gen':>10}{'eval s/gen':>11}{'LLM in':>8}")
    for g in groups:
        used = f"{g['used_share']:.0%}" if "used_share" in g else "-"
        llm_s = f"{g['llm_seconds_per_generation']:.1f}" if "used_share" in g else "-"
        ev = f"{g['evaluation_seconds_per_generation']:.1f}" if "used_share" in g else "-"
        entered = g.get("llm_entered_share", g.get("classical_entered_share"))
        print(f"{g['ratio']:>4} {g['label']:<40}{g['seeds']:>6}"
              f"{g['best_fitness_mean']:>9.2f} ± {g['best_fitness_sd']:<4.2f}{g['held_out_mean']:>9.2f} ± "
              f"{g['held_out_sd']:<4.2f}{used:>7}{llm_s:>10}{ev:>11}"
              f"{'-' if entered is None else f'{entered:.0%}':>8}")
    print("(LLM in: share of crossover/mutation offspring that entered the population; for genetic, its "
          "classical ones)")
    checks = goals(groups)
    if a.plot and groups:
        plot(rows, groups, a.plot)
    if a.out:
        Path(a.out).write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "runs": rows,
                                           "groups": groups, "checks": checks}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
