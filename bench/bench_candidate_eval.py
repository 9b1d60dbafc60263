"""Candidate evaluation on a resident model vs the exported standalone checkpoint.

A LLaMA-2-7B-shaped model (random bf16 weights, built on the GPU) is sorted once by
`PrunableModel`; for each plan we time (i) `evaluate.perplexity` with the candidate
applied by `PrunableModel.apply` (views of the sorted weights), (ii) the same candidate
exported with `export.export` and loaded standalone with `from_pretrained`, and (iii)
the switch to the candidate (`apply` of a new plan). Goals: resident/standalone <= 1.10,
switch <= 5% of an evaluation. With --throughput-out, the standalone checkpoints'
prefill/decode throughput (bench_export_throughput's measurement) is taken too.

    PYTHONPATH=pruner_image python bench/bench_candidate_eval.py --out candidate_eval.json
    PYTHONPATH=pruner_image python bench/bench_candidate_eval.py --tiny --device cpu   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import _throughput as T  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="2 layers, hidden 64: a smoke test")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--metric", default="wanda-sp", choices=("wanda-sp", "flap", "magnitude"))
    p.add_argument("--head-modes", default="per-group,kv-group",
                   help="comma list; with 32 heads and 32 KV heads, per-group can only drop whole attention")
    p.add_argument("--export-modes", default="kv-group", help="head modes whose candidates are exported too")
    p.add_argument("--plans", default=",".join(C.PLAN_NAMES))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--eval-tokens", type=int, default=32768, help="tokens per evaluation (2 batches of 8x2048)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    p.add_argument("--switch-repeats", type=int, default=7)
    p.add_argument("--calibration-windows", type=int, default=4)
    p.add_argument("--calibration-seq-len", type=int, default=2048)
    p.add_argument("--export-dir", default="/tmp/selfpruner_bench")
    p.add_argument("--deadline", type=float, default=480, help="seconds; no new export starts after this")
    p.add_argument("--throughput-out", default=None, help="also measure throughput; JSON path")
    T.throughput_args(p)
    p.add_argument("--out", default="candidate_eval.json")
    args = p.parse_args(argv)
    if args.tiny:
        C.shrink_for_tiny(args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from selfpruner import evaluate
    from selfpruner.pruned_model import PrunableModel

    t_start = time.perf_counter()
    cfg = C.llama_config(args.tiny)
    s = C.setup(cfg, args.device, metric=args.metric, calibration_windows=args.calibration_windows,
                calibration_seq_len=args.calibration_seq_len)
    base, g = s["model"], s["geometry"]
    ids = torch.randint(cfg.vocab_size, (args.eval_tokens,), generator=torch.Generator().manual_seed(7))
    kw = dict(seq_len=args.seq_len, max_tokens=args.eval_tokens, batch_size=args.batch_size)
    results = {"benchmark": "candidate_eval", "date": time.strftime("%Y-%m-%d"), "machine": C.machine(),
               "command": " ".join(["python"] + sys.argv), "settings": vars(args),
               "setup_timings": s["timings"], "modes": {}}
    throughput = {"benchmark": "export_throughput", "date": results["date"], "machine": results["machine"],
                  "command": results["command"], "settings": vars(args), "rows": []}

    def save():
        Path(args.out).write_text(json.dumps(results, indent=2))
        if args.throughput_out:
            Path(args.throughput_out).write_text(json.dumps(throughput, indent=2))

    def ev(model):
        return evaluate.perplexity(model, ids, **kw)

    modes = args.head_modes.split(",")
    names = args.plans.split(",")
    for k, mode in enumerate(modes):
        model = base if k == len(modes) - 1 else copy.deepcopy(base)  # sorting is in place
        t = time.perf_counter()
        pm = PrunableModel(model, s["scores"], s["stats"], head_mode=mode, bias_compensation=False)
        C.sync()
        res = {"sort_s": time.perf_counter() - t, "candidates": {}}
        results["modes"][mode] = res
        dense_t, _, dense_ppl = C.timed(lambda: ev(model), repeats=args.repeats)
        res["dense"] = {"eval_s": dense_t, "perplexity": dense_ppl.perplexity, "tokens": dense_ppl.tokens}
        if args.throughput_out and mode in args.export_modes.split(",") and not throughput["rows"]:
            throughput["rows"].append(T.throughput_row("dense", model, None, g, args))
            save()
        plans = C.plans(g, mode, args.mlp_multiple)
        for i, name in enumerate(names):
            plan, other = plans[name], plans[names[i - 1]] if len(names) > 1 else plans[name]
            row = {"achieved_ratio": plan.achieved_ratio, "kept_params": plan.kept_params,
                   "layer0": vars(plan.layers[0]), "layerN": vars(plan.layers[-1])}
            for bc in (False, True):  # the flag only decides whether apply() computes the compensation
                pm.bias_compensation = bc
                times = []
                for _ in range(args.switch_repeats + 1):
                    pm.apply(other)
                    C.sync()
                    t = time.perf_counter()
                    pm.apply(plan)
                    C.sync()
                    times.append(time.perf_counter() - t)
                row["switch_s" if not bc else "switch_bias_comp_s"] = sorted(times[1:])[len(times[1:]) // 2]
            pm.bias_compensation = False
            pm.apply(plan)
            row["eval_s"], row["eval_times_s"], ppl = C.timed(lambda: ev(model), repeats=args.repeats)
            row["perplexity"], row["nll"] = ppl.perplexity, ppl.nll
            row["switch_fraction"] = row["switch_s"] / row["eval_s"]
            row["switch_bias_comp_fraction"] = row["switch_bias_comp_s"] / row["eval_s"]
            res["candidates"][name] = row
            save()
            if mode not in args.export_modes.split(","):
                continue
            if time.perf_counter() - t_start > args.deadline:
                row["standalone"] = "skipped: past --deadline"
                continue
            out_dir = Path(args.export_dir) / f"{mode}-{name}"
            try:
                sa, facts = C.export_and_load(pm, out_dir, args.device, info={"benchmark": name})
                facts["eval_s"], facts["eval_times_s"], sppl = C.timed(lambda: ev(sa), repeats=args.repeats)
                facts["perplexity"] = sppl.perplexity
                facts["nll_rel_diff"] = abs(sppl.nll - ppl.nll) / abs(ppl.nll)
                row["standalone"] = facts
                row["resident_over_standalone"] = row["eval_s"] / facts["eval_s"]
                if args.throughput_out:
                    throughput["rows"].append(T.throughput_row(f"{mode}-{name}", sa, plan, g, args))
                del sa
            except Exception as e:  # report and go on: one failing load must not lose the rest
                row["standalone"] = f"failed: {type(e).__name__}: {e}"
                print(f"standalone {mode}-{name} failed: {type(e).__name__}: {e}", flush=True)
            finally:
                C.remove(out_dir)
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
            save()
        pm.restore()
        del pm, model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    results["total_s"] = time.perf_counter() - t_start
    if torch.cuda.is_available():
        results["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if len(throughput["rows"]) > 1:
        T.add_speedups(throughput["rows"])
    save()

    print(f"\n{results['machine'].get('gpu', 'cpu')}: {args.eval_tokens} tokens per evaluation "
          f"(batch {args.batch_size} x {args.seq_len}), medians of {args.repeats}, MLP channels in multiples of "
          f"{args.mlp_multiple}; setup {s['timings']}")
    print(f"{'mode':9s} {'plan':12s} {'removed':>7s} {'resident s':>10s} {'standalone s':>12s} {'ratio':>6s} "
          f"{'switch ms':>9s} {'frac':>6s} {'sw+bc ms':>8s} {'frac':>6s} {'loads_with':>17s}")
    for mode, res in results["modes"].items():
        print(f"{mode:9s} {'dense':12s} {0:7.3f} {res['dense']['eval_s']:10.3f}")
        for name, r in res["candidates"].items():
            sa = r.get("standalone")
            sa_t = f"{sa['eval_s']:12.3f}" if isinstance(sa, dict) else f"{'-':>12s}"
            ratio = f"{r['resident_over_standalone']:6.3f}" if isinstance(sa, dict) else f"{'-':>6s}"
            lw = sa["loads_with"] if isinstance(sa, dict) else ("-" if sa is None else "FAILED/skipped")
            print(f"{mode:9s} {name:12s} {r['achieved_ratio']:7.3f} {r['eval_s']:10.3f} {sa_t} {ratio} "
                  f"{1e3 * r['switch_s']:9.2f} {r['switch_fraction']:6.2%} {1e3 * r['switch_bias_comp_s']:8.2f} "
                  f"{r['switch_bias_comp_fraction']:6.2%} {lw:>17s}")
    if len(throughput["rows"]) > 1:
        print()
        T.print_throughput(throughput["rows"])
    print(f"results written to {args.out} ({results['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
