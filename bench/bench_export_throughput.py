"""Throughput of exported (physically smaller) checkpoints vs the dense model.

A LLaMA-2-7B-shaped model (random bf16 weights, built on the GPU) is sorted once; each
plan is applied, exported with `export.export`, loaded standalone with
`from_pretrained` and measured: prefill (batch x seq tokens in one forward, tokens/s)
and batch-1 greedy decode with the KV cache (new tokens/s). The speedup over dense is
divided by the parameter ratio (dense block params / kept block params); the goal for
prefill is >= 0.95. bench_candidate_eval.py --throughput-out takes the same numbers
in the same run (saves device time).

    PYTHONPATH=pruner_image python bench/bench_export_throughput.py --out export_throughput.json
    PYTHONPATH=pruner_image python bench/bench_export_throughput.py --tiny --device cpu   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="2 layers, hidden 64: a smoke test")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--metric", default="wanda-sp", choices=("wanda-sp", "flap", "magnitude"))
    p.add_argument("--head-mode", default="kv-group", choices=("kv-group", "per-group"))
    p.add_argument("--plans", default="uniform-0.2,uniform-0.3,uniform-0.5")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    p.add_argument("--calibration-windows", type=int, default=4)
    p.add_argument("--calibration-seq-len", type=int, default=2048)
    p.add_argument("--export-dir", default="/tmp/selfpruner_bench")
    C.throughput_args(p)
    p.add_argument("--out", default="export_throughput.json")
    args = p.parse_args(argv)
    if args.tiny:
        C.shrink_for_tiny(args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from selfpruner.pruned_model import PrunableModel

    t0 = time.perf_counter()
    s = C.setup(C.llama_config(args.tiny), args.device, metric=args.metric,
                calibration_windows=args.calibration_windows, calibration_seq_len=args.calibration_seq_len)
    model, g = s["model"], s["geometry"]
    pm = PrunableModel(model, s["scores"], s["stats"], head_mode=args.head_mode)
    results = {"benchmark": "export_throughput", "date": time.strftime("%Y-%m-%d"), "machine": C.machine(),
               "command": " ".join(["python"] + sys.argv), "settings": vars(args), "rows": []}

    def save():
        Path(args.out).write_text(json.dumps(results, indent=2))

    results["rows"].append(C.throughput_row("dense", model, None, g, args))  # the original modules
    save()
    plans = C.plans(g, args.head_mode, args.mlp_multiple)
    for name in args.plans.split(","):
        pm.apply(plans[name])
        out_dir = Path(args.export_dir) / name
        try:
            sa, facts = C.export_and_load(pm, out_dir, args.device, info={"benchmark": name})
            row = C.throughput_row(f"{args.head_mode}-{name}", sa, plans[name], g, args)
            row["standalone"] = facts
            results["rows"].append(row)
            del sa
        finally:
            C.remove(out_dir)
            pm.restore()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        save()
    C.add_speedups(results["rows"])
    results["total_s"] = time.perf_counter() - t0
    save()
    print(f"\n{results['machine'].get('gpu', 'cpu')}: prefill batch {args.prefill_batch} x {args.prefill_seq}, "
          f"decode batch 1, {args.decode_prompt}-token prompt, {args.decode_new} new tokens; medians of {args.repeats}")
    C.print_throughput(results["rows"])
    print(f"results written to {args.out} ({results['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
