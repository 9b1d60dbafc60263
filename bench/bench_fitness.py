"""What the search's evaluation tokens buy: perplexity against KL-to-dense fitness, staged
selection on fresh windows, token budgets, and one rate per block against separate attention
and MLP rates.

Why: at the paper's budget (430 full evaluations) the genetic search's best overfits its fitness
text, and one-window screening ranked offspring badly (docs/benchmarks.md §4). EvoPress and
DarwinLM use KL divergence to the dense model, fresh minibatches for every selection and
several selection stages. This runs `selfpruner.search.runner.run` per (β, strategy, variant,
rates, seed) on the demo model and scores every best candidate on held-out text no search saw.

Variants (T = --tokens fitness tokens, 430 × T the paper's token count):
  ppl         perplexity fitness, 430 full evaluations (the baseline)
  kl          KL fitness, the same tokens
  kl-staged   KL fitness, --stages (each on windows drawn afresh), the same tokens
  kl-staged20 the same at 20 % of the tokens
  kl-screen   KL fitness, one screen --screen (default every offspring on an eighth of the tokens,
              the best 2 at full fidelity: EvoPress's own default), the same tokens
  kl-screen20 the same at 20 % of the tokens, and for genetic an initial population of
              --lean-population (its 30 full evaluations would be 35 % of that budget)
`--rates block,separate`: one rate per block, or separate attention and MLP rates.
`--refit`: every variant with pruning.refit (least-squares refit of o_proj/down_proj on the kept
channels instead of bias compensation alone); its rows are labelled VARIANT+refit.

    PYTHONPATH=pruner_image python3 bench/bench_fitness.py --model .carry/SmolLM2-135M-Instruct.Q4_1.gguf \
        --ratios 0.3,0.5 --seeds 0,1,2 --out fitness.json                 # GPU
    PYTHONPATH=pruner_image .venv/bin/python bench/bench_fitness.py --tiny  # CPU smoke test
Rerunning with the same --workdir resumes (finished runs are read back); --report-only evaluates
nothing and reports what the folders hold.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_search  # noqa: E402  (its model sources, tiny model and cost helpers)

VARIANTS = ("ppl", "kl", "kl-staged", "kl-staged20", "kl-screen", "kl-screen20")
PAPER_EVALUATIONS = 430


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--ratios", default="0.3,0.5")
    p.add_argument("--strategies", default="genetic,evopress")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rates", default="block,separate", help="block: one rate per block; separate: attention + MLP")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--stages", default="1024:8,4096:2", help="tokens:survivors,...")
    p.add_argument("--screen", default=None,
                   help="tokens:survivors of the kl-screen variants' one screen (default: an eighth of --tokens, 2)")
    p.add_argument("--lean-population", type=int, default=10, help="genetic's population in kl-screen20")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--refit", action="store_true", help="pruning.refit on: refit the consumers of pruned channels")
    p.add_argument("--held-out-tokens", type=int, default=32768)
    p.add_argument("--calibration-windows", type=int, default=32)
    p.add_argument("--max-rate", type=float, default=0.8)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--tf32", action="store_true",
                   help="float32 matrix products in TF32 on the GPU (3-5x faster on the demo model; the weights stay float32)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="evaluate nothing: join the rows of earlier --out files into one table (and --out)")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama, tiny budget (CPU)")
    p.add_argument("--warm", action="store_true",
                   help="only fill the caches (converted model, calibration, dense reference), then stop")
    a = p.parse_args(argv)
    a.population, a.generations, a.crossovers, a.mutations = 30, 20, 10, 10
    if a.tiny:
        a.tokens, a.seq_len, a.held_out_tokens, a.calibration_windows = 512, 128, 1024, 4
        a.population, a.generations, a.crossovers, a.mutations = 4, 10, 2, 2  # 20 %: 8.8 evaluations
        a.stages, a.lean_population, a.seeds, a.ratios = "128:2", 2, "0", "0.3"
    a.stage_list = stage_list(a.stages)
    a.screen_list = stage_list(a.screen or f"{max(2, a.tokens // 8)}:2")  # EvoPress's own default screen
    a.workdir = Path(a.workdir or ("runs/bench_fitness_tiny" if a.tiny else "runs/bench_fitness"))
    return a


def stage_list(text: str) -> list[dict]:
    return [{"tokens": int(t), "survivors": int(s)} for t, s in (x.split(":") for x in text.split(","))]


def paper_evaluations(a) -> int:
    return a.population + a.generations * (a.crossovers + a.mutations)


def job(a, src: dict, ratio: float, strategy: str, variant: str, rates: str, seed: int, out: Path) -> dict:
    fitness = {"text": src["fitness"], "seqLen": a.seq_len, "tokens": a.tokens, "batchSize": a.batch_size,
               "heldOutText": src["heldout"], "heldOutTokens": a.held_out_tokens,
               "metric": "perplexity" if variant == "ppl" else "kl", "topK": a.top_k}
    search = {"strategy": strategy, "population": a.population, "generations": a.generations,
              "crossovers": a.crossovers, "mutations": a.mutations, "seed": seed, "baselines": ["uniform"]}
    if variant.startswith("kl-staged"):
        fitness["stages"] = a.stage_list
    if variant.startswith("kl-screen"):
        fitness["stages"] = a.screen_list
    if variant == "kl-screen20" and strategy == "genetic":
        search["population"] = a.lean_population
    if variant != "ppl":  # the same tokens as the baseline, or a fifth of them
        share = 0.2 if variant.endswith("20") else 1.0
        search["budget"] = {"tokens": int(share * paper_evaluations(a) * a.tokens)}
    spec = {"model": {"source": src["model"]},
            "target": {"ratio": ratio, "minRate": 0.0, "maxRate": a.max_rate, "separateRates": rates == "separate"},
            "pruning": {"metric": "wanda-sp", "biasCompensation": True, "refit": a.refit},
            "calibration": {"text": src["calibration"], "windows": a.calibration_windows, "seqLen": a.seq_len},
            "fitness": fitness, "search": search, "output": {"path": str(out), "export": False}}
    name = f"fit-{round(ratio * 100)}-{strategy}-{variant}-{rates}-{seed}" + ("-refit" if a.refit else "")
    return {"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob", "metadata": {"name": name}, "spec": spec}


def row_of(result: dict, out: Path) -> dict:
    c = result["cost"]
    dense = result["dense"]["held_out_perplexity"]
    best = result["best"]
    return {"best_fitness": best["fitness"], "held_out": best["held_out_perplexity"], "dense_held_out": dense,
            "held_out_over_dense": best["held_out_perplexity"] / dense,
            "uniform_held_out": result["baselines"]["uniform"]["held_out_perplexity"],
            "achieved_ratio": best["achieved_ratio"], **bench_search.search_cost(out),
            "budget_spent": c["budget_spent"], "evaluations": c["evaluations"], "wall_seconds": c["wall_seconds"],
            "generations": len(result.get("best_per_generation") or []) - 1, "best_rates": best["rates"]}


def generalisation(row: dict, ppl_executor, tokens: int, dense_fitness_ppl: float) -> dict:
    """The best candidate's perplexity on the fitness text (whatever the search's metric), and
    held-out/dense over fitness/dense: 1 when what the search saw generalises, above 1 when the
    search fitted its own text."""
    from selfpruner.executors.base import EvalTask

    ppl = ppl_executor.evaluate([EvalTask(rates=row["best_rates"], tokens=tokens)])[0].fitness
    return {"fitness_perplexity": ppl, "dense_fitness_perplexity": dense_fitness_ppl,
            "generalisation": row["held_out_over_dense"] / (ppl / dense_fitness_ppl)}


def _with_metric(spec, metric: str) -> dict:
    doc = json.loads(json.dumps(dict(spec)))
    doc["spec"]["fitness"]["metric"] = metric
    doc["spec"]["fitness"].pop("stages", None)
    return doc


def write_out(a, rows: list[dict], summary: list[dict], args: dict | None = None) -> None:
    if args is None:
        args = {k: v for k, v in vars(a).items() if k not in ("workdir", "merge")} | {"workdir": str(a.workdir)}
    Path(a.out).write_text(json.dumps({"rows": rows, "summary": summary, "args": args,
                                       "date": time.strftime("%Y-%m-%d")}, indent=2, default=str) + "\n")


def merge(a) -> int:
    """One table from the --out files of processes that ran parts of the matrix; a run present
    in several files (a resumed process) counts once. Its args are the ones every part ran with
    (what differed between parts shows in the rows), not the merging command's own."""
    rows, seen, part_args = [], set(), []
    for f in a.merge:
        doc = json.loads(Path(f).read_text())
        part_args.append(doc.get("args", {}))
        for r in doc["rows"]:
            key = (r["ratio"], r["strategy"], r["variant"], r["rates"], r["seed"])
            if key not in seen and "held_out" in r:
                seen.add(key)
                rows.append(r)
    rows.sort(key=lambda r: (r["ratio"], r["strategy"], r["rates"], r["variant"], r["seed"]))
    summary = summarise(rows)
    print_table(rows, summary)
    if a.out:
        common = {k: v for k, v in part_args[0].items() if all(p.get(k) == v for p in part_args[1:])}
        write_out(a, rows, summary, common | {"merged": [Path(f).name for f in a.merge]})
        print(f"wrote {a.out}")
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.merge:
        return merge(a)
    if a.tf32:
        import torch

        torch.set_float32_matmul_precision("high")
    from selfpruner import spec as spec_mod
    from selfpruner.errors import UserError
    from selfpruner.executors.for_spec import make_executor
    from selfpruner.search import runner

    a.workdir.mkdir(parents=True, exist_ok=True)
    src = bench_search.sources(a)
    if a.warm:  # what parallel processes would otherwise each compute at once
        from selfpruner.executors.base import EvalTask

        for variant in ("ppl", "kl"):
            spec = spec_mod.parse(job(a, src, 0.3, "genetic", variant, "block", 0, a.workdir / "_warm"))
            ex = make_executor(spec, progress=False)
            ex.evaluate([EvalTask(rates=[0.0] * ex.geometry.num_layers, tokens=a.tokens)])
        print("warm: model, calibration and dense reference cached")
        return 0
    plan = [(float(r), s, v, k, int(seed)) for r in a.ratios.split(",") for s in a.strategies.split(",")
            for v in a.variants.split(",") for k in a.rates.split(",") for seed in a.seeds.split(",")]
    executors: dict[str, object] = {}  # one per fitness metric, shared by every run
    dense_ppl: list[float] = []
    rows = []

    def executor(spec, metric):
        if metric not in executors:
            executors[metric] = make_executor(spec, progress=False)
        return executors[metric]

    def scored(row, spec):
        ppl = executor(spec if spec.spec.fitness.metric == "perplexity" else
                       spec_mod.parse(_with_metric(spec, "perplexity")), "perplexity")
        if not dense_ppl:
            from selfpruner.executors.base import EvalTask

            dense_ppl.append(ppl.evaluate([EvalTask(rates=[0.0] * ppl.geometry.num_layers, tokens=a.tokens)])[0].fitness)
        return {**row, **generalisation(row, ppl, a.tokens, dense_ppl[0])}

    started = time.time()
    for ratio, strategy, variant, rates, seed in plan:
        row = {"ratio": ratio, "strategy": strategy, "variant": variant + ("+refit" if a.refit else ""),
               "rates": rates, "seed": seed}
        try:
            probe = spec_mod.parse(job(a, src, ratio, strategy, variant, rates, seed, a.workdir))
        except UserError as e:
            rows.append({**row, "skipped": f"invalid: {e}"})
            continue
        out = a.workdir / f"r{ratio}-{strategy}-{row['variant']}-{rates}-s{seed}-{runner.spec_hash(probe)}"
        spec = spec_mod.parse(job(a, src, ratio, strategy, variant, rates, seed, out))
        row["dir"] = str(out)
        if (out / "result.json").is_file():
            done = {**row, **row_of(json.loads((out / "result.json").read_text()), out)}
            rows.append(done if a.report_only else scored(done, spec))
            continue
        if a.report_only:
            rows.append({**row, "skipped": "not run", **(bench_search.partial(out) or {})})
            continue
        print(f"run β={ratio} {strategy} {variant} {rates} seed {seed} ({time.time() - started:.0f} s)", flush=True)
        try:
            result = runner.run(spec, progress=False, out_dir=out, executor=executor(spec, spec.spec.fitness.metric))
        except Exception as e:  # one failed run must not lose the others
            print(f"  failed: {type(e).__name__}: {e}", flush=True)
            rows.append({**row, "skipped": f"failed: {type(e).__name__}: {e}"})
            continue
        rows.append(scored({**row, **row_of(result, out)}, spec))
        if a.out:  # after every run: a process stopped early keeps what it finished
            write_out(a, rows, summarise(rows))
    summary = summarise(rows)
    print_table(rows, summary)
    if a.out:
        write_out(a, rows, summary)
        print(f"wrote {a.out}")
    return 0


def summarise(rows: list[dict]) -> list[dict]:
    """Mean over seeds per (β, strategy, variant, rates): held-out perplexity, its ratio to dense,
    search tokens; and the generalisation ratio (held-out/dense over fitness/dense, perplexity only)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "held_out" in r:
            groups.setdefault((r["ratio"], r["strategy"], r["variant"], r["rates"]), []).append(r)
    out = []
    for (ratio, strategy, variant, rates), rs in sorted(groups.items()):
        out.append({"ratio": ratio, "strategy": strategy, "variant": variant, "rates": rates, "seeds": len(rs),
                    "held_out_mean": statistics.mean(r["held_out"] for r in rs),
                    "held_out_min": min(r["held_out"] for r in rs),
                    "held_out_over_dense_mean": statistics.mean(r["held_out_over_dense"] for r in rs),
                    "generalisation_mean": statistics.mean(r["generalisation"] for r in rs if "generalisation" in r)
                    if any("generalisation" in r for r in rs) else None,
                    "search_tokens_mean": statistics.mean(r["search_tokens"] for r in rs),
                    "generations_mean": statistics.mean(r["generations"] for r in rs)})
    return out


def print_table(rows: list[dict], summary: list[dict]) -> None:
    print(f"\n{'β':>4} {'strategy':<9}{'variant':<16}{'rates':<9}{'seeds':>5}{'held-out':>10}{'÷ dense':>8}"
          f"{'general.':>9}{'search tok':>12}{'gens':>6}")
    for s in summary:
        g = s["generalisation_mean"]
        print(f"{s['ratio']:>4} {s['strategy']:<9}{s['variant']:<16}{s['rates']:<9}{s['seeds']:>5}"
              f"{s['held_out_mean']:>10.2f}{s['held_out_over_dense_mean']:>8.3f}{'-' if g is None else f'{g:.3f}':>9}"
              f"{s['search_tokens_mean']:>12.0f}{s['generations_mean']:>6.1f}")
    skipped = [r for r in rows if "skipped" in r]
    for r in skipped:
        print(f"  skipped: β={r['ratio']} {r['strategy']} {r['variant']} {r['rates']} seed {r['seed']}: {r['skipped']}")


if __name__ == "__main__":
    raise SystemExit(main())
