"""What one level-switch mutation of the uniform allocation changes in the pruned structure:
layers whose plan differs from the parent's, and layers whose attention (query heads per group)
differs, for one rate per block and for separate attention and MLP rates. No model is loaded:
the plan comes from the geometry alone (`structure.plan_from_rates`).

Why: EvoPress starts from the uniform allocation and keeps a child only if it is better; with
separate rates on SmolLM2-135M it never left that start (docs/benchmarks.md §10b), because
attention rounding carried between blocks made any child move heads in a fifth of the layers.
With attention rounded per block (§10c) a first move changes MLP channels only, as with one
rate per block; attention still moves only once accepted moves add up to a whole head.

    PYTHONPATH=pruner_image python3 bench/bench_mutation_reach.py            # SmolLM2-135M's geometry
    PYTHONPATH=pruner_image python3 bench/bench_mutation_reach.py --mutants 1000 --ratios 0.2,0.3,0.5
"""

from __future__ import annotations

import argparse

import numpy as np

from selfpruner.architecture import Geometry
from selfpruner.search import operators
from selfpruner.search.space import SearchSpace
from selfpruner.structure import plan_from_rates

SMOLLM2_135M = Geometry("llama", num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
                        intermediate_size=1536)


def reach(g: Geometry, ratio: float, separate: bool, mutants: int, seed: int, max_rate: float) -> dict:
    space = SearchSpace(num_blocks=g.num_layers, ratio=ratio, max_rate=max_rate, separate=separate,
                        attention_weight=g.dense_attention_params, mlp_weight=g.dense_mlp_params)
    parent = space.uniform()
    base = plan_from_rates(g, space.to_rates(parent)).layers
    rng = np.random.default_rng(seed)
    changed, attention = [], []
    for _ in range(mutants):
        child = plan_from_rates(g, space.to_rates(operators.mutate(space, parent, rng, moves=1))).layers
        changed.append(sum(a != b for a, b in zip(base, child)))
        attention.append(sum(a.heads_per_group != b.heads_per_group or a.kv_groups != b.kv_groups
                             for a, b in zip(base, child)))
    return {"ratio": ratio, "rates": "separate" if separate else "block", "layers_changed": float(np.mean(changed)),
            "attention_changed": float(np.mean(attention)),
            "attention_unchanged_share": float(np.mean([a == 0 for a in attention]))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", default="0.3,0.5")
    p.add_argument("--mutants", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rate", type=float, default=0.8)
    a = p.parse_args(argv)
    g = SMOLLM2_135M
    print(f"{'β':>4} {'rates':<9}{'layers changed':>15}{'attention changed':>19}{'attention same':>16}")
    for ratio in (float(r) for r in a.ratios.split(",")):
        for separate in (False, True):
            r = reach(g, ratio, separate, a.mutants, a.seed, a.max_rate)
            print(f"{ratio:>4} {r['rates']:<9}{r['layers_changed']:>15.2f}{r['attention_changed']:>19.2f}"
                  f"{r['attention_unchanged_share']:>16.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
