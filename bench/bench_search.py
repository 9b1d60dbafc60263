"""The search at equal budget: every strategy, at several β, at full and multi-fidelity.

Why: the project claims that a searched per-block allocation beats uniform, OWL and random
at the same number of evaluations, that multi-fidelity screening reaches the same best for
a fraction of the tokens, and that a 135M-parameter LLM can run the evolution. This runs
`selfpruner.search.runner.run` once per (β, strategy, fidelity) and checks those claims on
perplexity over held-out text that no search ever saw (fitness: demo:fitness, held out:
demo:heldout, calibration: demo:calibration -- three disjoint sets of works).

Budget (the paper's): κ = 30, 20 generations of 10 crossovers + 10 mutations = 430 full
evaluations of `--tokens` tokens. Random and EvoPress spend the 430; genetic and
llm-evolution run their 20 generations. uniform/owl are one evaluation each.

Multi-fidelity: offspring are screened on tokens/S and the best `keep` share of them
(at least one) goes on to full fidelity. The initial population is always full. Search
tokens, in units of one full evaluation: full = 30 + 20·20 = 430; multi = 30 + 20·(20/S +
max(1, ⌈20·keep⌉)). tokens/8 with keep 0.25 would be 30 + 20·(2.5 + 5) = 180 (42 %), so
the defaults are S = 16 (one 512-token window at 8192) and keep 0.05 (one child per
generation): 30 + 20·(1.25 + 1) = 75, 17.4 % of the full run -- under the 20 % goal.
EvoPress screens in every mode (tokens/8, or tokens/S under multi) and spends the whole
budget either way; random/uniform/owl never screen, so they run at full fidelity only.
Token counts exclude the report's own evaluations (dense, baselines, held-out text).

    PYTHONPATH=pruner_image python3 bench/bench_search.py --out search.json      # GPU, real model
    PYTHONPATH=pruner_image .venv/bin/python bench/bench_search.py --tiny        # CPU smoke test
Rerunning with the same --workdir resumes: finished runs are read back, unfinished ones resume.
`--report-only` evaluates nothing (no GPU needed): it prints the table from the folders, with an
unfinished run's progress read from its last checkpoint -- how a run cut short by a machine's
time limit is still reported (bench/search_on_device.sh runs this on a GPU in parallel).
"""

from __future__ import annotations

import argparse
import json
import math
import string
import sys
import time
from pathlib import Path

EVOLUTIONARY = ("llm-evolution", "genetic")  # strategies whose tokens multi-fidelity cuts
SCREENING = EVOLUTIONARY + ("evopress",)
ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="model source: demo, a .gguf file or a HF folder")
    p.add_argument("--ratios", default="0.2,0.3,0.5")
    p.add_argument("--strategies", default="llm-evolution,genetic,random,evopress,owl,uniform")
    p.add_argument("--fidelity", default="full,multi")
    p.add_argument("--tokens", type=int, default=8192, help="full-fidelity fitness tokens")
    p.add_argument("--screen-divisor", type=int, default=16, help="multi: screenTokens = tokens / this")
    p.add_argument("--screen-keep", type=float, default=0.05, help="multi: share of screened offspring kept")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--held-out-tokens", type=int, default=32768)
    p.add_argument("--calibration-windows", type=int, default=32)
    p.add_argument("--max-rate", type=float, default=0.8)
    p.add_argument("--population", type=int, default=30)
    p.add_argument("--generations", type=int, default=20)
    p.add_argument("--crossovers", type=int, default=10)
    p.add_argument("--mutations", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llm-model", default=None, help="the LLM of llm-evolution (default: --model; demo if --tiny)")
    p.add_argument("--llm-max-tokens", type=int, default=1024)
    p.add_argument("--llm-per-call", type=int, default=5, help="offspring asked per LLM call")
    p.add_argument("--workdir", default=None, help="one run folder per (ratio, strategy, fidelity)")
    p.add_argument("--out", default=None, help="JSON of every run and the goal checks")
    p.add_argument("--deadline", type=float, default=None, help="seconds; later runs are skipped (recorded)")
    p.add_argument("--report-only", action="store_true",
                   help="evaluate nothing: report finished runs, and unfinished ones from their last checkpoint")
    p.add_argument("--plot", default=None, help="PNG: held-out perplexity by strategy at each β")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama, random texts, tiny budget (CPU)")
    p.add_argument("--tiny-llm", action="store_true", help="with --tiny: run llm-evolution too (slow on CPU)")
    a = p.parse_args(argv)
    if a.tiny:
        a.tokens, a.seq_len, a.held_out_tokens, a.calibration_windows = min(a.tokens, 512), 128, 1024, 4
        a.population, a.generations, a.crossovers, a.mutations = 4, 2, 2, 2
        a.llm_max_tokens = min(a.llm_max_tokens, 160)
        a.llm_per_call = min(a.llm_per_call, 2)
    a.workdir = Path(a.workdir or ("runs/bench_search_tiny" if a.tiny else "runs/bench_search"))
    a.llm_model = a.llm_model or ("demo" if a.tiny else a.model)
    return a


def build_tiny(folder: Path) -> dict:
    """A 6-block random Llama with a character tokenizer and three random texts (as tests/conftest.py)."""
    paths = {n: folder / f"{n}.txt" for n in ("calibration", "fitness", "heldout")}
    if not (folder / "model" / "config.json").is_file():
        import torch
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(ALPHABET) + 2, hidden_size=48, intermediate_size=80, num_hidden_layers=6,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                          tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        LlamaForCausalLM(cfg).eval().save_pretrained(folder / "model")
        vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(ALPHABET)}}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
        tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                pad_token="</s>").save_pretrained(folder / "model")
        for i, path in enumerate(paths.values()):
            g = torch.Generator().manual_seed(10 + i)
            path.write_text("".join(ALPHABET[j] for j in torch.randint(0, len(ALPHABET), (6000,), generator=g)))
    return {"model": str(folder / "model"), **{n: str(p) for n, p in paths.items()}}


def sources(a) -> dict:
    """The model and texts of the runs: the tiny model (--tiny) or the demo's."""
    if a.tiny:
        return build_tiny(a.workdir / "_tiny")
    return {"model": a.model, "calibration": "demo:calibration", "fitness": "demo:fitness", "heldout": "demo:heldout"}


def goal_checker():
    """(checks, check): check(goal, met, text) prints a goal's verdict and records it in checks."""
    checks: list[dict] = []

    def check(goal, ok, text):
        checks.append({"goal": goal, "met": ok, "detail": text})
        print(f"  [{'n/a' if ok is None else 'met' if ok else 'MISSED'}] {text}")

    return checks, check


def job(a, src: dict, ratio: float, strategy: str, fidelity: str, out: Path) -> dict:
    fitness = {"text": src["fitness"], "seqLen": a.seq_len, "tokens": a.tokens, "batchSize": a.batch_size,
               "heldOutText": src["heldout"], "heldOutTokens": a.held_out_tokens}
    if fidelity == "multi":
        fitness.update(screenTokens=max(2, a.tokens // a.screen_divisor), screenKeep=a.screen_keep)
    spec = {"model": {"source": src["model"]},
            "target": {"ratio": ratio, "minRate": 0.0, "maxRate": a.max_rate},
            "pruning": {"metric": "wanda-sp", "biasCompensation": True},
            "calibration": {"text": src["calibration"], "windows": a.calibration_windows, "seqLen": a.seq_len},
            "fitness": fitness,
            "search": {"strategy": strategy, "population": a.population, "generations": a.generations,
                       "crossovers": a.crossovers, "mutations": a.mutations, "seed": a.seed,
                       "baselines": ["uniform", "owl"]},
            "llm": {"provider": "local", "model": a.llm_model, "maxTokens": a.llm_max_tokens,
                    "offspringPerCall": a.llm_per_call},
            "output": {"path": str(out), "export": False}}
    return {"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob",
            "metadata": {"name": f"bench-{round(ratio * 100)}-{strategy}-{fidelity}"}, "spec": spec}


def search_cost(out: Path) -> dict:
    """Tokens and device-seconds of the search itself (the report's evaluations left out)."""
    from selfpruner.search.history import History

    t = History(out / "history.jsonl").totals()
    return {"search_tokens": t["search_tokens_evaluated"], "search_device_seconds": round(t["search_device_seconds"], 2)}


def partial(out: Path) -> dict | None:
    """An unfinished run's progress from its last checkpoint: generations, evaluations, best
    fitness on the search text (no held-out perplexity: that is measured only at the end)."""
    from selfpruner.search import runner

    if not (out / runner.STATE).is_file():
        return None
    st = json.loads((out / runner.STATE).read_text())["strategy"]
    best = st.get("best_per_generation", [])
    return {"generations_done": len(best) - 1, "best_per_generation": best, "evaluations": st.get("spent"),
            "best_fitness": min(best) if best else None, **search_cost(out), **llm_stats(out, st.get("counters", {}))}


def llm_stats(out: Path, counters: dict) -> dict:
    """What the LLM did: calls, generation time, unusable replies, and the share of the offspring
    it was asked for that were used as written."""
    from selfpruner.search.history import read_jsonl

    calls = read_jsonl(out / "llm_transcript.jsonl")
    if not calls:
        return {}
    seconds = sum(e.get("seconds", 0.0) for e in calls)
    asked = counters.get("llm_offspring_asked", 0)
    return {"llm_calls": len(calls), "llm_completion_tokens": sum(e.get("completion_tokens", 0) for e in calls),
            "llm_seconds": round(seconds, 1), "llm_seconds_per_call": round(seconds / len(calls), 1),
            "llm_unparseable_replies": counters.get("llm_unparseable_replies", 0),
            "llm_offspring_asked": asked, "llm_as_written": counters.get("llm_as_written", 0),
            "as_written_share": counters.get("llm_as_written", 0) / asked if asked else None}


def fmt(x, spec=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def plot(rows: list[dict], ratios: list[float], path: Path) -> None:
    """Grouped bars of held-out perplexity (finished runs), the dense model as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "held_out" in r]
    names = list(dict.fromkeys(f"{r['strategy']} {r['fidelity']}" for r in done))
    fig, ax = plt.subplots(figsize=(2.2 + 1.2 * len(ratios) * max(1, len(names)) / 4, 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, ratio in enumerate(ratios):
            r = next((r for r in done if r["ratio"] == ratio and f"{r['strategy']} {r['fidelity']}" == name), None)
            if r:
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(r["held_out"])
        ax.bar(xs, ys, width, label=name)
    if done:
        ax.axhline(done[0]["dense_held_out"], color="black", lw=1, ls="--", label="dense")
    ax.set_xticks(range(len(ratios)), [f"β = {r}" for r in ratios])
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.legend(fontsize=7, ncol=2)
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

    started = time.time()
    a.workdir.mkdir(parents=True, exist_ok=True)
    src = sources(a)
    ratios = [float(r) for r in a.ratios.split(",")]
    strategies = [s for s in a.strategies.split(",") if s]
    if a.tiny and not a.tiny_llm and "llm-evolution" in strategies:
        strategies.remove("llm-evolution")
        print("--tiny: llm-evolution skipped (the demo LLM is too slow on CPU; --tiny-llm runs it)")
    plan = [(r, s, f) for r in ratios for s in strategies for f in a.fidelity.split(",")
            if f == "full" or s in SCREENING]
    executor, llm, rows = None, None, []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for ratio, strategy, fidelity in plan:
        # the folder name carries the spec's hash (defaults applied, output aside): a rerun with
        # the same package resumes there, a changed schema or default starts a fresh folder
        key = runner.spec_hash(spec_mod.parse(job(a, src, ratio, strategy, fidelity, a.workdir)))
        out = a.workdir / f"r{ratio}-{strategy}-{fidelity}-{key}"
        spec = spec_mod.parse(job(a, src, ratio, strategy, fidelity, out))
        row = {"ratio": ratio, "strategy": strategy, "fidelity": fidelity, "dir": str(out)}
        if (out / "result.json").is_file() and (out / runner.STATE).is_file():
            result, row["resumed"] = json.loads((out / "result.json").read_text()), "finished before"
        elif a.report_only:
            progress = partial(out)
            rows.append({**row, "skipped": "not run"} if progress is None else {**row, "partial": True, **progress})
            continue
        elif a.deadline is not None and time.time() - started > a.deadline:
            rows.append({**row, "skipped": "deadline"})
            continue
        else:
            if executor is None:  # one model, calibrated once, shared by every run
                executor = make_executor(spec, progress=False)
            if strategy == "llm-evolution" and llm is None:
                llm = LocalChat(a.llm_model, temperature=spec.spec.llm.temperature, seed=spec.spec.llm.seed,
                                max_tokens=a.llm_max_tokens, device=device)
            print(f"run β={ratio} {strategy} {fidelity} ...", flush=True)
            try:
                result = runner.run(spec, progress=False, out_dir=out, executor=executor,
                                    llm_client=llm if strategy == "llm-evolution" else None)
            except Exception as e:  # one failed run must not lose the others
                print(f"  failed: {type(e).__name__}: {e}", flush=True)
                rows.append({**row, "skipped": f"failed: {type(e).__name__}: {e}"})
                continue
        c = result["cost"]
        st = json.loads((out / runner.STATE).read_text())["strategy"]
        uni = result["baselines"]["uniform"]["held_out_perplexity"]
        rows.append({**row, "best_fitness": result["best"]["fitness"],
                     "held_out": result["best"]["held_out_perplexity"], "uniform_held_out": uni,
                     "owl_held_out": result["baselines"]["owl"]["held_out_perplexity"],
                     "dense_held_out": result["dense"]["held_out_perplexity"],
                     "achieved_ratio": result["best"]["achieved_ratio"], **search_cost(out),
                     "tokens_evaluated": c["tokens_evaluated"], "device_seconds": c["device_seconds"],
                     "evaluations": c["evaluations"], "budget_spent": c["budget_spent"],
                     "wall_seconds": c["wall_seconds"], "rates": result["best"]["rates"],
                     "best_per_generation": st.get("best_per_generation", []),
                     **llm_stats(out, st.get("counters", {}))})

    print(f"\n{'β':>4} {'strategy':<14}{'fid.':<6}{'best fit':>9}{'held-out':>10}{'vs unif':>8}{'search tok':>11}"
          f"{'device-s':>9}{'LLM calls':>10}{'as written':>11}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['ratio']:>4} {r['strategy']:<14}{r['fidelity']:<6}  skipped ({r['skipped'][:60]})")
            continue
        share = r.get("as_written_share")
        if r.get("partial"):
            print(f"{r['ratio']:>4} {r['strategy']:<14}{r['fidelity']:<6}{fmt(r['best_fitness'], '.2f'):>9}"
                  f"{'unfinished':>18}{r['search_tokens']:>11}{r['search_device_seconds']:>9.1f}"
                  f"{fmt(r.get('llm_calls'), 'd'):>10}{'-' if share is None else f'{share:.0%}':>11}"
                  f"  ({r['generations_done']} generations, {r['evaluations']:.0f} evaluations)")
            continue
        print(f"{r['ratio']:>4} {r['strategy']:<14}{r['fidelity']:<6}{fmt(r['best_fitness'], '.2f'):>9}"
              f"{fmt(r['held_out'], '.2f'):>10}{fmt(r['held_out'] / r['uniform_held_out']):>8}"
              f"{r['search_tokens']:>11}{r['search_device_seconds']:>9.1f}{fmt(r.get('llm_calls'), 'd'):>10}"
              f"{'-' if share is None else f'{share:.0%}':>11}")
    print("(search tok / device-s: the search's own evaluations; held-out text never seen by any search)")

    get = {(r["ratio"], r["strategy"], r["fidelity"]): r for r in rows if "skipped" not in r and not r.get("partial")}
    progress = {(r["ratio"], r["strategy"], r["fidelity"]): r for r in rows if "skipped" not in r}
    checks, check = goal_checker()

    print("\nGoal 1: the searched allocation beats uniform, owl and random (held-out ppl, equal budget)")
    for ratio in ratios:
        rand = get.get((ratio, "random", "full"))
        for s in SCREENING:
            r = get.get((ratio, s, "full"))
            if r is None:
                continue
            rivals = {"uniform": r["uniform_held_out"], "owl": r["owl_held_out"],
                      "random": rand["held_out"] if rand else None}
            beaten = {k: v is not None and r["held_out"] < v for k, v in rivals.items()}
            text = ", ".join(f"{k} {fmt(v, '.2f')}" for k, v in rivals.items())
            check(1, all(beaten.values()) if rand else None,
                  f"β={ratio} {s} {r['held_out']:.2f} vs {text}" + ("" if rand else " (random not run)"))
    print("\nGoal 2: multi-fidelity best within 2 % of full-fidelity best, with <= 20 % of the search tokens")
    for ratio in ratios:
        for s in SCREENING:
            full, multi = get.get((ratio, s, "full")), get.get((ratio, s, "multi"))
            if full and multi:
                gap = multi["best_fitness"] / full["best_fitness"] - 1
                share = multi["search_tokens"] / full["search_tokens"]
                check(2, gap <= 0.02 and share <= 0.20,
                      f"β={ratio} {s}: fitness {multi['best_fitness']:.2f} vs {full['best_fitness']:.2f} "
                      f"({gap:+.1%}), tokens {share:.1%} of full")
    print("\nllm-evolution (LLM: %s) compared with genetic, held-out ppl at full fidelity:" % a.llm_model)
    for ratio in ratios:
        l, g = get.get((ratio, "llm-evolution", "full")), get.get((ratio, "genetic", "full"))
        lp, gp = progress.get((ratio, "llm-evolution", "full")), progress.get((ratio, "genetic", "full"))
        if lp and gp and (l is None or g is None):
            # cut short: compare the best search fitness after the generations both have run
            n = min(len(lp["best_per_generation"]), len(gp["best_per_generation"])) - 1
            lb, gb = min(lp["best_per_generation"][:n + 1]), min(gp["best_per_generation"][:n + 1])
            print(f"  β={ratio}: after {n} generations (llm-evolution unfinished), best search fitness "
                  f"llm-evolution {lb:.2f} vs genetic {gb:.2f} ({lb / gb - 1:+.1%}); {lp['llm_calls']} LLM calls, "
                  f"{lp['llm_seconds_per_call']:.0f} s a call, {lp['llm_unparseable_replies']} unparseable replies, "
                  f"{lp['llm_as_written']} of {lp['llm_offspring_asked']} offspring used as written")
        elif l and g:
            verdict = "better" if l["held_out"] < g["held_out"] else "not better"
            print(f"  β={ratio}: llm-evolution {l['held_out']:.2f} vs genetic {g['held_out']:.2f} "
                  f"({l['held_out'] / g['held_out'] - 1:+.1%}, {verdict}); {l['llm_calls']} LLM calls, "
                  f"{l['llm_seconds']:.0f} s of generation, {fmt(l['as_written_share'], '.0%')} used as written")
        else:
            print(f"  β={ratio}: not compared (a run is missing)")
    if a.plot:
        plot(rows, ratios, Path(a.plot))
    report = {"args": {k: str(v) for k, v in vars(a).items()}, "device": device, "torch": torch.__version__,
              "runs": rows, "checks": checks, "wall_seconds": round(time.time() - started, 1)}
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {a.out}")
    print(f"total {report['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
