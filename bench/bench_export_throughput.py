"""Throughput of exported (physically smaller) checkpoints vs the dense model.

Three ways to get the models, the same measurements for each (bf16): prefill (batch x seq
tokens in one forward, logits of the last position only, tokens/s), greedy decode with the KV
cache at each of --decode-batches (eager `generate`, and on a GPU a static cache replayed as
CUDA graphs; new tokens/s over the batch), peak GPU memory of each, and (--split) where prefill
time goes: attention and MLP of sampled blocks, their GEMMs alone, and what lies outside the
blocks. Every speedup over dense is also divided by the parameter ratio (dense block params /
kept block params); the goal for prefill is >= 0.95.

- default: a LLaMA-2-7B-shaped model (random weights, built on the GPU) is sorted once; each
  plan is applied, exported with `export.export`, loaded standalone with `from_pretrained` and
  measured. bench_candidate_eval.py --throughput-out takes the same numbers in the same run.
- --checkpoints DENSE [NAME=]DIR ...: existing folders (what `selfpruner prune`/`run` export),
  the first one dense (a folder, a .gguf file or `demo`, loaded as `selfpruner.model_source`
  resolves it; our pruned checkpoints with the installed modeling code, no trust_remote_code).
- --shape llama2-70b: the paper's scale on one H200. The dense model (random bf16 weights,
  128.5 GiB) is built on the GPU, measured, then pruned IN PLACE to each of --targets in turn
  (uniform kv-group plans from `structure.plan_from_rates`: whole KV groups with their heads and
  MLP channels, the same in every block). `PrunableModel` slices by views that keep the dense
  weights alive, so this script slices each projection itself, one at a time (the kept rows or
  columns copied, the old tensor freed): the peak stays the model plus one projection. The
  pruned shapes and parameter counts are checked against the plan and the target (a wrong
  prune stops the run); with --tiny the pruned logits are also compared with
  `PrunableModel.apply` of the same plan on a copy of the dense model.

    PYTHONPATH=pruner_image python bench/bench_export_throughput.py --out export_throughput.json
    PYTHONPATH=pruner_image python bench/bench_export_throughput.py --shape llama2-70b --out speed_70b.json
    PYTHONPATH=pruner_image python bench/bench_export_throughput.py --checkpoints DENSE p30=DIR p50=DIR --out speed_ckpt.json
    # smoke tests: the same with --tiny --device cpu (--checkpoints takes real folders, e.g. demo and a `selfpruner prune` output)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import _throughput as T  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="small shapes of the same proportions: a smoke test")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="llama2-7b", choices=tuple(C.SHAPES),
                   help="the random model; llama2-70b is measured dense, then pruned in place to each --targets")
    p.add_argument("--checkpoints", nargs="+", metavar="[NAME=]DIR",
                   help="measure these folders instead of a random model; the first is dense")
    p.add_argument("--targets", default="0.3,0.5",
                   help="llama2-70b: fractions of the dense block params to remove, in order (each prunes further)")
    p.add_argument("--tolerance", type=float, default=0.01, help="llama2-70b: |achieved - target| allowed")
    p.add_argument("--metric", default="wanda-sp", choices=("wanda-sp", "flap", "magnitude"))
    p.add_argument("--head-mode", default="kv-group", choices=("kv-group", "per-group"))
    p.add_argument("--plans", default="uniform-0.2,uniform-0.3,uniform-0.5")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    p.add_argument("--calibration-windows", type=int, default=4)
    p.add_argument("--calibration-seq-len", type=int, default=2048)
    p.add_argument("--export-dir", default="/tmp/selfpruner_bench")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="--checkpoints: the dtype they load in")
    p.add_argument("--split", action=argparse.BooleanOptionalAction, default=True,
                   help="also time attention, MLP and their GEMMs apart at the prefill shape")
    T.throughput_args(p)
    p.set_defaults(mlp_multiple=None)
    p.add_argument("--out", default="export_throughput.json")
    args = p.parse_args(argv)
    if args.mlp_multiple is None:  # 1 as before for the 7B runs; 70B: 128-aligned widths (section 2: they matter)
        args.mlp_multiple = 128 if args.shape == "llama2-70b" else 1
        if args.tiny and args.shape == "llama2-70b":  # the same number of units in a 1/32-wide MLP
            args.mlp_multiple = 128 * C.TINY[args.shape]["intermediate_size"] // C.SHAPES[args.shape][
                "intermediate_size"]
    if args.tiny:
        C.shrink_for_tiny(args)
    return args


def block_params(model) -> int:
    """Weights of q/k/v/o and gate/up/down over all blocks (what architecture.Geometry counts)."""
    return sum(mod.weight.numel() for layer in model.get_decoder().layers
               for name, mod in layer.named_modules() if name.rsplit(".", 1)[-1] in PROJECTIONS)


def total_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the paper's scale: a random model pruned in place ------------------------------------------
def _keep_rows(lin: nn.Linear, n: int) -> None:
    if n == lin.out_features:
        return
    if n > lin.out_features:
        raise ValueError(f"cannot grow {lin.out_features} output rows to {n}")
    lin.weight = nn.Parameter(lin.weight.data[:n].clone(), requires_grad=False)  # the old tensor is freed here
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.data[:n].clone(), requires_grad=False)
    lin.out_features = n


def _keep_cols(lin: nn.Linear, n: int) -> None:
    if n == lin.in_features:
        return
    if n > lin.in_features:
        raise ValueError(f"cannot grow {lin.in_features} input columns to {n}")
    lin.weight = nn.Parameter(lin.weight.data[:, :n].contiguous(), requires_grad=False)
    lin.in_features = n


@torch.no_grad()
def prune_in_place(model, plan) -> None:
    """Slice every block to its shape in a uniform kv-group plan, one projection at a time: the first
    KV groups (with their query heads) and the first MLP channels stay, copied into a contiguous
    tensor, and the old tensor is freed before the next projection. The weights are random, so which
    groups stay does not change the speed; `PrunableModel` keeps the first ones of its sorted order,
    the same set for identity scores (what --tiny checks)."""
    g = plan.geometry
    if plan.head_mode != "kv-group" or not plan.is_uniform:
        raise ValueError("in-place pruning takes uniform kv-group plans")
    hd = g.head_dim
    for layer, s in zip(model.get_decoder().layers, plan.layers):
        if s.num_heads == 0 or s.channels == 0:
            raise NotImplementedError("a block without attention or MLP: export and load the checkpoint instead")
        a, m = layer.self_attn, layer.mlp
        for lin, n in ((a.q_proj, s.num_heads * hd), (a.k_proj, s.kv_groups * hd), (a.v_proj, s.kv_groups * hd),
                       (m.gate_proj, s.channels), (m.up_proj, s.channels)):
            _keep_rows(lin, n)
        _keep_cols(a.o_proj, s.num_heads * hd)
        _keep_cols(m.down_proj, s.channels)
        a.num_key_value_groups = s.heads_per_group
    s = plan.layers[0]
    try:  # what a plain export's config would say (the caches size themselves from the tensors anyway)
        model.config.num_attention_heads, model.config.num_key_value_heads = s.num_heads, s.kv_groups
        model.config.intermediate_size = s.channels
    except Exception as e:  # noqa: BLE001 - a config that refuses the values changes no measurement
        print(f"config not updated: {type(e).__name__}: {e}", flush=True)


def check_pruned(model, plan, target: float, dense_total: int, tolerance: float) -> dict:
    """Every block has the plan's shapes, the block params are the plan's and within `tolerance` of
    the target, and the model lost exactly those; raises otherwise (a wrong prune reports no speedup)."""
    g = plan.geometry
    hd, h = g.head_dim, g.hidden_size
    for i, (layer, s) in enumerate(zip(model.get_decoder().layers, plan.layers)):
        a, m = layer.self_attn, layer.mlp
        want = {"q_proj": (s.num_heads * hd, h), "k_proj": (s.kv_groups * hd, h), "v_proj": (s.kv_groups * hd, h),
                "o_proj": (h, s.num_heads * hd), "gate_proj": (s.channels, h), "up_proj": (s.channels, h),
                "down_proj": (h, s.channels)}
        got = {n: tuple(getattr(a if n in PROJECTIONS[:4] else m, n).weight.shape) for n in want}
        if got != want:
            raise RuntimeError(f"block {i}: shapes {got}, the plan says {want}")
    kept = block_params(model)
    removed = 1 - kept / g.prunable_params
    total = total_params(model)
    if kept != plan.kept_params:
        raise RuntimeError(f"{kept} block params kept, the plan keeps {plan.kept_params}")
    if abs(removed - target) > tolerance:
        raise RuntimeError(f"removed {removed:.4f} of the block params, the target is {target} +- {tolerance}")
    if total != dense_total - (g.prunable_params - kept):
        raise RuntimeError(f"{total} params in the model, expected {dense_total - (g.prunable_params - kept)}")
    return {"kept_block_params": kept, "achieved_ratio": removed, "total_params": total}


def _identity_scores(g):
    from selfpruner.importance import LayerScores

    return [LayerScores(heads=torch.arange(g.num_heads, 0, -1, dtype=torch.float64),
                        channels=torch.arange(g.intermediate_size, 0, -1, dtype=torch.float64))
            for _ in range(g.num_layers)]


@torch.no_grad()
def compare_with_product(model, ref, plan, vocab: int) -> float:
    """Max |logit difference| of the in-place model against PrunableModel.apply(plan) on the dense copy."""
    ref.apply(plan)
    device = next(model.parameters()).device
    ids = torch.randint(vocab, (2, 16), generator=torch.Generator().manual_seed(4)).to(device)
    a, b = model(input_ids=ids).logits.float(), ref.model(input_ids=ids).logits.float()
    diff = (a - b).abs().max().item()
    scale = b.abs().max().item()
    if not diff <= 1e-2 * max(scale, 1.0):
        raise RuntimeError(f"in-place pruned logits differ from PrunableModel's by {diff} (scale {scale})")
    return diff


def run_in_place(args, results, save) -> None:
    from selfpruner import structure
    from selfpruner.architecture import geometry_of
    from selfpruner.pruned_model import PrunableModel

    cfg = C.llama_config(args.tiny, args.shape)
    g = geometry_of(cfg)
    targets = [float(t) for t in args.targets.split(",")]
    plans = [structure.plan_from_rates(g, structure.Rates.uniform(t, g.num_layers), head_mode="kv-group",
                                       mlp_multiple=args.mlp_multiple) for t in targets]
    for t, plan, prev in zip(targets, plans, [None] + plans[:-1]):  # cheap checks before 128 GiB are built
        s = plan.layers[0]
        if abs(plan.achieved_ratio - t) > args.tolerance:
            raise SystemExit(f"target {t}: the plan removes {plan.achieved_ratio:.4f} "
                             f"(mlp multiple {args.mlp_multiple})")
        if prev is not None and (s.kv_groups > prev.layers[0].kv_groups or s.channels > prev.layers[0].channels):
            raise SystemExit(f"target {t} keeps more than the target before it: give --targets in increasing order")
    results["geometry"] = vars(g) | {"prunable_params": g.prunable_params}
    results["plans"] = {str(t): {"achieved_ratio": p.achieved_ratio, "kept_block_params": p.kept_params,
                                 "block": vars(p.layers[0]) | {"num_heads": p.layers[0].num_heads}}
                        for t, p in zip(targets, plans)}
    torch.manual_seed(0)
    T.reset_peak()
    t0 = time.perf_counter()
    model = C.build_model(cfg, args.device)
    C.sync()
    dense_total = total_params(model)
    results["build"] = {"s": time.perf_counter() - t0, "peak_gib": T.peak_gib(), "params": dense_total,
                        "gib": dense_total * 2 / 2**30}
    print(f"built {args.shape}{' (tiny)' if args.tiny else ''}: {dense_total / 1e9:.2f} B params, "
          f"{results['build']['s']:.1f} s, peak {results['build']['peak_gib']} GiB", flush=True)
    ref = None
    if args.tiny:  # the product's slicing of the same plans, on a dense copy, for the logits check
        ref = PrunableModel(copy.deepcopy(model), _identity_scores(g), None, head_mode="kv-group")
    row = {"name": "dense", "kept_block_params": g.prunable_params, "param_ratio": 1.0, "achieved_ratio": 0.0,
           "total_params": dense_total, "total_param_ratio": 1.0}
    results["rows"].append(T.measure(row, model, args, "dense"))
    save()
    for t, plan in zip(targets, plans):
        T.reset_peak()
        t1 = time.perf_counter()
        prune_in_place(model, plan)
        free_memory()
        C.sync()
        facts = check_pruned(model, plan, t, dense_total, args.tolerance)
        s = plan.layers[0]
        row = {"name": f"kv-group-{t}", "target": t, **facts,
               "param_ratio": g.prunable_params / facts["kept_block_params"],
               "total_param_ratio": dense_total / facts["total_params"], "block": vars(s) | {"num_heads": s.num_heads},
               "prune_s": time.perf_counter() - t1, "prune_peak_gib": T.peak_gib(),
               "allocated_gib": torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None}
        if ref is not None:
            row["max_logit_diff_vs_prunable_model"] = compare_with_product(model, ref, plan, cfg.vocab_size)
        print(f"pruned to {t}: {s.kv_groups} KV groups ({s.num_heads} heads), {s.channels} channels, removed "
              f"{facts['achieved_ratio']:.4f} of the block params ({row['prune_s']:.1f} s)", flush=True)
        results["rows"].append(T.measure(row, model, args, row["name"]))
        save()


# -- existing folders ------------------------------------------------------------------------
def load_checkpoint(source: str, device: str, dtype: str):
    """A folder, .gguf or `demo` the way the product resolves it, without its tokenizer (random
    benchmark exports have none); our pruned checkpoints with the installed modeling code."""
    from selfpruner import model_source
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, ours = model_source.resolve(source)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    cls = (model_source.bundled_class(config, source) if ours else None) or AutoModelForCausalLM
    model = cls.from_pretrained(folder, config=config, dtype=getattr(torch, dtype), trust_remote_code=False,
                                device_map={"": device} if device != "cpu" else None)
    return model.eval().requires_grad_(False), folder


def run_checkpoints(args, results, save) -> None:
    dense_block = dense_total = None
    for k, spec in enumerate(args.checkpoints):
        name, _, path = spec.rpartition("=")
        name = "dense" if k == 0 else (name or Path(path).name)
        T.reset_peak()
        t = time.perf_counter()
        model, folder = load_checkpoint(path, args.device, args.dtype)
        C.sync()
        kept, total = block_params(model), total_params(model)
        if k == 0:
            dense_block, dense_total = kept, total
        meta_file = Path(folder) / "pruning.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        row = {"name": name, "source": path, "folder": folder, "class": type(model).__name__,
               "loads_with": meta.get("loads_with", "plain"), "load_s": time.perf_counter() - t,
               "load_peak_gib": T.peak_gib(), "kept_block_params": kept, "param_ratio": dense_block / kept,
               "achieved_ratio": 1 - kept / dense_block, "total_params": total,
               "total_param_ratio": dense_total / total}
        if meta:
            row["pruning_json"] = {"achieved_ratio": meta.get("achieved_ratio"), "params": meta.get("params")}
            said = meta.get("params", {}).get("prunable_dense")
            if said != dense_block:
                row["warning"] = (f"pruning.json says {said} dense block params, "
                                  f"the dense model has {dense_block}: a checkpoint of another model?")
                print(f"{name}: {row['warning']}", flush=True)
        print(f"{name}: {type(model).__name__}, {total / 1e9:.3f} B params, block params x {row['param_ratio']:.3f}, "
              f"loaded in {row['load_s']:.1f} s", flush=True)
        results["rows"].append(T.measure(row, model, args, name))
        save()
        del model
        free_memory()


# -- the 7B-shaped model: plans applied, exported, loaded standalone --------------------------------
def run_export(args, results, save) -> None:
    from selfpruner.pruned_model import PrunableModel

    s = C.setup(C.llama_config(args.tiny, args.shape), args.device, metric=args.metric,
                calibration_windows=args.calibration_windows, calibration_seq_len=args.calibration_seq_len)
    model, g = s["model"], s["geometry"]
    pm = PrunableModel(model, s["scores"], s["stats"], head_mode=args.head_mode)
    results["rows"].append(T.throughput_row("dense", model, None, g, args))  # the original modules
    save()
    plans = C.plans(g, args.head_mode, args.mlp_multiple)
    for name in args.plans.split(","):
        pm.apply(plans[name])
        out_dir = Path(args.export_dir) / name
        try:
            sa, facts = C.export_and_load(pm, out_dir, args.device, info={"benchmark": name})
            row = T.throughput_row(f"{args.head_mode}-{name}", sa, plans[name], g, args)
            row["standalone"] = facts
            results["rows"].append(row)
            del sa
        finally:
            C.remove(out_dir)
            pm.restore()
            free_memory()
        save()


def main(argv=None) -> int:
    args = parse_args(argv)
    mode = "checkpoints" if args.checkpoints else ("in_place" if args.shape == "llama2-70b" else "export")
    t0 = time.perf_counter()
    # the models of checkpoints mode come built: the options that build them would only mislead a reader
    building = ("shape", "targets", "tolerance", "metric", "head_mode", "plans", "calibration_windows",
                "calibration_seq_len", "export_dir", "mlp_multiple")
    settings = {k: v for k, v in vars(args).items() if not (mode == "checkpoints" and k in building)}
    results = {"benchmark": f"export_throughput/{mode}", "date": time.strftime("%Y-%m-%d"), "machine": C.machine(),
               "command": " ".join(["python"] + sys.argv), "settings": settings, "rows": []}

    def save():
        if len(results["rows"]) > 1:
            T.add_speedups(results["rows"])
        results["total_s"] = time.perf_counter() - t0
        peaks = [m["peak_gib"] for r in results["rows"] for m in r.values()
                 if isinstance(m, dict) and m.get("peak_gib") is not None]
        results["max_memory_allocated_gib"] = max(peaks, default=None)  # the largest of the measurements' peaks
        Path(args.out).write_text(json.dumps(results, indent=2))

    {"checkpoints": run_checkpoints, "in_place": run_in_place, "export": run_export}[mode](args, results, save)
    save()
    print(f"\n{results['machine'].get('gpu', 'cpu')}: prefill batch {results['rows'][0]['prefill']['batch']} x "
          f"{args.prefill_seq}, decode batches {args.decode_batches}, {args.decode_prompt}-token prompt, "
          f"{args.decode_new} new tokens; medians of {args.repeats}")
    T.print_throughput(results["rows"])
    T.print_split(results["rows"])
    print(f"results written to {args.out} ({results['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
