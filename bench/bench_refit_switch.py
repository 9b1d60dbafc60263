"""What `pruning.refit` costs a candidate: the switch to a plan with the refit (cold, and from
the cache of refitted widths) against the switch with bias compensation, next to one
fitness evaluation.

Why: the refit lowered searched held-out perplexity 24-35 % (docs/benchmarks.md §10e), but
every candidate the search evaluates is applied with it, and a switch that costs a sizeable
share of an evaluation slows every strategy. One refit is a matrix product and two
triangular solves per projection and block; the cache keeps the last widths of each.

Plans are random per-block rates around β (the shapes a search proposes); each is applied
after a different plan, as in a search. `cold` empties the refit caches before every apply.

    PYTHONPATH=pruner_image python3 bench/bench_refit_switch.py --model SmolLM2-135M-Instruct.Q4_1.gguf --tf32 --out refit_switch.json
    PYTHONPATH=pruner_image .venv/bin/python bench/bench_refit_switch.py --model demo --plans 4 --tokens 1024   # CPU
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--ratios", default="0.3,0.5")
    p.add_argument("--plans", type=int, default=20, help="random plans per ratio")
    p.add_argument("--tokens", type=int, default=8192, help="fitness tokens of the evaluation compared with")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--calibration-windows", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tf32", action="store_true", help="matrix products in TF32, as the fitness benchmarks ran")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def random_rates(n: int, ratio: float, rng: random.Random) -> tuple[float, ...]:
    """Per-block rates in [0, 0.8] with mean about `ratio`."""
    raw = [min(0.8, max(0.0, rng.gauss(ratio, 0.15))) for _ in range(n)]
    shift = ratio - sum(raw) / n
    return tuple(min(0.8, max(0.0, r + shift)) for r in raw)


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    if a.tf32:
        torch.set_float32_matmul_precision("high")
    from selfpruner import corpus, engine, evaluate, structure

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    settings = engine.PruneSettings(metric="wanda-sp", bias_compensation=True, refit=True,
                                    calibration_windows=a.calibration_windows, calibration_seq_len=a.seq_len)
    e = engine.prepare(a.model, settings, progress=False)
    setup_s = time.perf_counter() - t0
    pm, g = e.pm, e.pm.geometry
    ids = corpus.tokenize(e.loaded.tokenizer, corpus.load_text("demo:fitness"))

    def evaluation_s() -> float:
        times = []
        for _ in range(3):
            sync()
            t = time.perf_counter()
            evaluate.perplexity(pm.model, ids, seq_len=a.seq_len, max_tokens=a.tokens, batch_size=a.batch_size)
            sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def clear():
        for st in pm._attn_refit + pm._mlp_refit:
            st.cache.clear()

    rng = random.Random(a.seed)
    rows = []
    for ratio in (float(r) for r in a.ratios.split(",")):
        plans = [structure.plan_from_rates(g, structure.Rates(block=random_rates(g.num_layers, ratio, rng)),
                                           head_mode=pm.head_mode, mlp_multiple=settings.mlp_multiple)
                 for _ in range(a.plans + 1)]
        row = {"ratio": ratio, "plans": a.plans}
        for name, refit, cold in (("bias_compensation", False, False), ("refit_cold", True, True),
                                  ("refit_cached", True, False)):
            pm.refit = refit
            times = []
            for prev, plan in zip(plans, plans[1:]):
                if name == "refit_cached":
                    pm.apply(plan)  # fill the cache with this plan's widths
                pm.apply(prev)
                if cold:
                    clear()
                sync()
                t = time.perf_counter()
                pm.apply(plan)
                sync()
                times.append(time.perf_counter() - t)
            row[f"{name}_switch_ms"] = 1000 * statistics.median(times)
        pm.refit = True
        pm.apply(plans[1])
        row["evaluation_ms"] = 1000 * evaluation_s()
        for name in ("bias_compensation", "refit_cold", "refit_cached"):
            row[f"{name}_fraction"] = row[f"{name}_switch_ms"] / row["evaluation_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    pm.restore()
    dev = next(pm.model.parameters()).device
    result = {"benchmark": "refit_switch", "date": time.strftime("%Y-%m-%d"),
              "machine": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
              "command": " ".join(["python3", "bench/bench_refit_switch.py", *(argv or sys.argv[1:])]),
              "settings": vars(a), "setup_s": setup_s, "geometry": {"layers": g.num_layers, "hidden": g.hidden_size,
                                                                    "intermediate": g.intermediate_size},
              "rows": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'β':>4} {'bias comp ms':>13} {'refit cold ms':>14} {'refit cached ms':>16} {'eval ms':>8} "
          f"{'cold/eval':>10}")
    for r in rows:
        print(f"{r['ratio']:>4} {r['bias_compensation_switch_ms']:>13.1f} {r['refit_cold_switch_ms']:>14.1f} "
              f"{r['refit_cached_switch_ms']:>16.1f} {r['evaluation_ms']:>8.1f} {r['refit_cold_fraction']:>10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
