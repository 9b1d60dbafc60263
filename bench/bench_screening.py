"""How well a short screen ranks candidates against the full fitness evaluation.

Why: multi-fidelity missed its goal on the H200 (docs/benchmarks.md §4): screening 20 offspring on
one 512-token window and promoting the best one left the search 6-21 % behind full fidelity. This
measures the screen itself, on real candidates: offspring from the second half of a genetic run
(similar quality, so hard to tell apart -- the population a screen actually faces).

One forward pass per candidate gives the loss of each of the 16 fitness windows, so every screen
of k windows is read off the same pass: the first k windows (what the search does now) or k
windows spread over the fitness text. For each screen it reports Spearman's ρ with the full
16-window fitness and the regret of a generation: from random groups of 20 candidates, promote the
screen's best, and report how much worse its full fitness is than the group's true best.

    PYTHONPATH=pruner_image python3 bench/bench_screening.py --history RUN/history.jsonl --out screening.json
    PYTHONPATH=pruner_image python3 bench/bench_screening.py --candidates bench/results/cpu_screening.json
The second form re-measures the candidates recorded in an earlier result.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--history", help="history.jsonl of a search: offspring are drawn from it")
    src.add_argument("--candidates", help="a result of this script: re-measure its candidates")
    p.add_argument("--n", type=int, default=40, help="candidates drawn from the history")
    p.add_argument("--min-generation", type=int, default=10)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--group", type=int, default=20, help="offspring per generation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    for pos, i in enumerate(order):
        r[i] = float(pos)
    return r


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def draw(history: Path, n: int, min_generation: int, tokens: int, seed: int) -> list[dict]:
    """Offspring evaluated at full fidelity in the later generations (the report's own rows left out)."""
    rows = [json.loads(x) for x in history.read_text().splitlines()]
    pool = [r for r in rows if r.get("generation", -1) >= min_generation and r.get("fitness")
            and not r["origin"].startswith("report:") and r.get("tokens_budget") == tokens]
    if not pool:
        raise SystemExit(f"{history}: no offspring of generation >= {min_generation} evaluated on {tokens} tokens")
    rng = random.Random(seed)
    picked = rng.sample(pool, min(n, len(pool)))
    return [{"rates": r["rates"], "recorded_fitness": r["fitness"]} for r in picked]


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    import torch.nn.functional as F

    from selfpruner import corpus, engine, evaluate, structure
    from selfpruner.architecture import geometry_of

    cands = (draw(Path(a.history), a.n, a.min_generation, a.tokens, a.seed) if a.history
             else json.loads(Path(a.candidates).read_text())["candidates"])
    settings = engine.PruneSettings(metric="wanda-sp", bias_compensation=True)
    eng = engine.prepare(a.model, settings, progress=False)
    model, geometry = eng.loaded.model, geometry_of(eng.loaded.model.config)
    wins = evaluate.eval_windows(corpus.tokenize(eng.loaded.tokenizer, corpus.load_text("demo:fitness")),
                                 a.seq_len, a.tokens)
    device = next(model.parameters()).device
    started = time.time()
    for i, c in enumerate(cands):
        plan = structure.plan_from_rates(geometry, structure.Rates.parse(c["rates"], geometry.num_layers),
                                         head_mode=settings.head_mode, mlp_multiple=settings.mlp_multiple)
        eng.pm.apply(plan)
        try:
            per_window = []
            with torch.no_grad():
                for batch in wins.split(a.batch_size):
                    logits = model(input_ids=batch.to(device), use_cache=False).logits[:, :-1].float()
                    nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:].to(device), reduction="none")
                    per_window += nll.mean(dim=1).double().tolist()
        finally:
            eng.pm.restore()
        c["window_nll"] = per_window
        c["fitness"] = math.exp(sum(per_window) / len(per_window))
        print(f"candidate {i + 1}/{len(cands)}: fitness {c['fitness']:.3f} "
              f"(recorded {c.get('recorded_fitness', float('nan')):.3f}), {time.time() - started:.0f} s", flush=True)

    n_win = len(wins)
    full = [c["fitness"] for c in cands]
    rng = random.Random(a.seed)
    groups = [rng.sample(range(len(cands)), min(a.group, len(cands))) for _ in range(500)]
    screens = []
    for k in (1, 2, 4, 8):
        for kind, idx in (("first", list(range(k))), ("spread", list(range(0, n_win, n_win // k))[:k])):
            score = [math.exp(sum(c["window_nll"][j] for j in idx) / k) for c in cands]
            regret = []
            for g in groups:
                pick = min(g, key=lambda i: score[i])
                regret.append(full[pick] / min(full[i] for i in g) - 1)
            screens.append({"windows": k, "kind": kind, "tokens": k * a.seq_len, "spearman": spearman(score, full),
                            "mean_regret": sum(regret) / len(regret),
                            "top1_share": sum(r == 0 for r in regret) / len(regret)})
    print(f"\n{len(cands)} candidates, full fitness {min(full):.2f}-{max(full):.2f}; "
          f"groups of {a.group}, 500 draws")
    print(f"{'screen':<16}{'tokens':>7}{'Spearman':>10}{'regret':>8}{'top-1':>7}")
    for s in screens:
        print(f"{s['kind'] + ' ' + str(s['windows']) + ' win':<16}{s['tokens']:>7}{s['spearman']:>10.3f}"
              f"{s['mean_regret']:>8.1%}{s['top1_share']:>7.0%}")
    agree = [abs(c["fitness"] / c["recorded_fitness"] - 1) for c in cands if c.get("recorded_fitness")]
    if agree:
        print(f"full fitness here vs recorded in the history: max relative difference {max(agree):.2e}")
    report = {"args": {k: v for k, v in vars(a).items() if k not in ("history", "candidates", "out")},
              "device": str(device), "torch": torch.__version__, "screens": screens, "candidates": cands,
              "max_relative_difference_to_recorded": max(agree) if agree else None,
              "wall_seconds": round(time.time() - started, 1)}
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
