"""Shared pieces of the GPU benchmarks: a LLaMA-2-7B-shaped model with random weights,
the candidate plans, synchronized timing, export + standalone load, throughput."""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

PLAN_NAMES = ("uniform-0.2", "uniform-0.3", "uniform-0.5", "ramp-0.3")


def llama_config(tiny: bool = False):
    from transformers import LlamaConfig

    if tiny:  # a few-second smoke test of the same code path
        kw = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=512)
    else:  # LLaMA-2-7B
        kw = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000)
    return LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       attn_implementation="sdpa", **kw)


def build_model(cfg, device: str, dtype=torch.bfloat16):
    """Random weights initialised directly on `device` in `dtype` (no CPU init)."""
    from transformers import LlamaForCausalLM

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval().requires_grad_(False)


def plans(geometry, head_mode: str, mlp_multiple: int = 1) -> dict:
    from selfpruner import structure

    n = geometry.num_layers
    ramp = tuple(0.1 + 0.4 * i / (n - 1) for i in range(n))  # 0.1 .. 0.5, mean 0.3
    rates = {"uniform-0.2": structure.Rates.uniform(0.2, n), "uniform-0.3": structure.Rates.uniform(0.3, n),
             "uniform-0.5": structure.Rates.uniform(0.5, n), "ramp-0.3": structure.Rates(block=ramp)}
    return {k: structure.plan_from_rates(geometry, r, head_mode=head_mode, mlp_multiple=mlp_multiple)
            for k, r in rates.items()}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *, warmup: int = 1, repeats: int = 3):
    """(median seconds, all seconds, last result) of fn() with device synchronization."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


def machine() -> dict:
    info = {"host_cpu": platform.machine(), "torch": torch.__version__}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def export_and_load(pm, out_dir: Path, device: str, dtype=torch.bfloat16, info: dict | None = None):
    """Export the applied candidate, load it standalone; (model, facts)."""
    from selfpruner import export
    from transformers import AutoModelForCausalLM

    sync()
    t = time.perf_counter()
    export.export(pm, None, out_dir, info=info or {}, force=True)
    t_export = time.perf_counter() - t
    meta = json.loads((Path(out_dir) / "pruning.json").read_text())
    remote = meta["loads_with"] != "plain"
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=dtype, trust_remote_code=remote,
                                                 device_map=device)
    model.eval().requires_grad_(False)
    sync()
    facts = {"export_s": t_export, "load_s": time.perf_counter() - t, "loads_with": meta["loads_with"],
             "checkpoint_bytes": folder_bytes(out_dir), "class": type(model).__name__,
             "params": sum(p.numel() for p in model.parameters())}
    return model, facts


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@torch.no_grad()
def prefill_throughput(model, *, batch: int, seq: int, vocab: int, warmup: int = 1, repeats: int = 3) -> dict:
    """Tokens/s of one forward over [batch, seq] (no cache, logits of the last position only)."""
    device = next(model.parameters()).device
    ids = torch.randint(vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    med, times, _ = timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1).logits,
                          warmup=warmup, repeats=repeats)
    return {"batch": batch, "seq": seq, "median_s": med, "times_s": times, "tokens_per_s": batch * seq / med}


@torch.no_grad()
def decode_throughput(model, *, prompt: int, new: int, vocab: int, repeats: int = 3) -> dict:
    """Batch-1 greedy decode with the KV cache: new tokens per second, the prompt's
    prefill taken out as (time for `new` tokens - time for 1 token) / (new - 1)."""
    device = next(model.parameters()).device
    ids = torch.randint(vocab, (1, prompt), generator=torch.Generator().manual_seed(2)).to(device)

    def gen(n):
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)

    t1, _, _ = timed(lambda: gen(1), warmup=1, repeats=repeats)
    tn, times, out = timed(lambda: gen(new), warmup=1, repeats=repeats)
    assert out.shape[1] == prompt + new, out.shape
    per_token = (tn - t1) / (new - 1)
    return {"prompt": prompt, "new": new, "median_s": tn, "times_s": times, "first_token_s": t1,
            "ms_per_token": 1e3 * per_token, "tokens_per_s": 1.0 / per_token, "tokens": out[0, prompt:].tolist()}


@torch.no_grad()
def decode_graph(model, *, prompt: int, new: int, vocab: int, repeats: int = 3, graph: bool = True) -> dict:
    """Batch-1 greedy decode with a static KV cache, each step replayed as one CUDA graph
    (no per-kernel launch cost): what the weights' size allows, unlike eager HF decode."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    ids = torch.randint(vocab, (1, prompt), generator=torch.Generator().manual_seed(2)).to(device)
    cache = StaticCache(config=model.config, max_cache_len=prompt + new)
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)
    hist = torch.zeros(1, new, dtype=torch.long, device=device)

    def step():
        logits = model(input_ids=tok, past_key_values=cache, cache_position=pos, position_ids=pos[None],
                       use_cache=True, logits_to_keep=1).logits
        tok.copy_(logits[:, -1].argmax(-1, keepdim=True))
        hist.index_copy_(1, pos - prompt + 1, tok)
        pos.add_(1)

    def prefill():
        cache.reset()
        logits = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt, device=device),
                       use_cache=True, logits_to_keep=1).logits
        tok.copy_(logits[:, -1].argmax(-1, keepdim=True))
        hist[:, :1] = tok
        pos.fill_(prompt)

    run = step
    if graph:
        prefill()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(s)
        prefill()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        run = g.replay
    times = []
    for _ in range(repeats + 1):
        prefill()
        sync()
        t = time.perf_counter()
        for _ in range(new - 1):
            run()
        sync()
        times.append(time.perf_counter() - t)
    per_token = statistics.median(times[1:]) / (new - 1)
    return {"prompt": prompt, "new": new, "graph": graph, "times_s": times[1:], "ms_per_token": 1e3 * per_token,
            "tokens_per_s": 1.0 / per_token, "tokens": hist[0].tolist()}


def setup(cfg, device: str, *, metric: str = "wanda-sp", calibration_windows: int = 4, calibration_seq_len: int = 2048,
          seed: int = 0) -> dict:
    """Random model, random calibration tokens, statistics and scores (timed)."""
    from selfpruner import calibration, importance
    from selfpruner.architecture import geometry_of

    torch.manual_seed(seed)
    out = {"timings": {}}
    t = time.perf_counter()
    out["model"] = build_model(cfg, device)
    sync()
    out["timings"]["build_s"] = time.perf_counter() - t
    cal = torch.randint(cfg.vocab_size, (calibration_windows * calibration_seq_len,),
                        generator=torch.Generator().manual_seed(seed + 1))
    t = time.perf_counter()
    out["stats"] = calibration.collect(out["model"], cal, num_windows=calibration_windows,
                                       seq_len=calibration_seq_len, progress=False)
    sync()
    out["timings"]["calibration_s"] = time.perf_counter() - t
    t = time.perf_counter()
    out["scores"] = importance.score_model(out["model"], out["stats"], metric)
    out["timings"]["score_s"] = time.perf_counter() - t
    out["geometry"] = geometry_of(cfg)
    return out


def throughput_row(name: str, model, plan, geometry, args) -> dict:
    """Prefill and decode throughput of one standalone model (plan None: dense)."""
    kept = geometry.prunable_params if plan is None else plan.kept_params
    row = {"name": name, "kept_block_params": kept, "param_ratio": geometry.prunable_params / kept,
           "achieved_ratio": 0.0 if plan is None else plan.achieved_ratio}
    v = model.config.vocab_size
    row["prefill"] = prefill_throughput(model, batch=args.prefill_batch, seq=args.prefill_seq, vocab=v,
                                        repeats=args.repeats)
    row["decode"] = decode_throughput(model, prompt=args.decode_prompt, new=args.decode_new, vocab=v,
                                      repeats=args.repeats)
    if torch.cuda.is_available():
        try:
            gd = decode_graph(model, prompt=args.decode_prompt, new=args.decode_new, vocab=v, repeats=args.repeats)
            same = [a == b for a, b in zip(gd["tokens"], row["decode"]["tokens"])]
            gd["tokens_same_as_generate"] = f"{sum(same)}/{len(same)}, first {same.index(False) if False in same else len(same)} in a row"
            row["decode_graph"] = gd
        except Exception as e:  # an optional measurement: record why it failed, go on
            row["decode_graph"] = {"failed": f"{type(e).__name__}: {e}"}
            print(f"graph decode failed for {name}: {type(e).__name__}: {e}", flush=True)
    return row


def add_speedups(rows: list[dict]) -> None:
    dense = next(r for r in rows if r["name"] == "dense")
    for r in rows:
        for kind in ("prefill", "decode", "decode_graph"):
            if "tokens_per_s" not in r.get(kind, {}) or "tokens_per_s" not in dense.get(kind, {}):
                continue
            s = r[kind]["tokens_per_s"] / dense[kind]["tokens_per_s"]
            r[kind]["speedup"] = s
            r[kind]["speedup_per_param_ratio"] = s / r["param_ratio"]


def print_throughput(rows: list[dict]) -> None:
    print(f"{'model':22s} {'removed':>7s} {'params x':>8s} {'prefill tok/s':>13s} {'speedup':>7s} {'/params':>7s} "
          f"{'decode tok/s':>12s} {'speedup':>7s} {'/params':>7s} {'graph tok/s':>11s} {'speedup':>7s} {'/params':>7s}")
    for r in rows:
        p, d, gd = r["prefill"], r["decode"], r.get("decode_graph", {})
        graph = (f" {gd['tokens_per_s']:11.1f} {gd['speedup']:7.3f} {gd['speedup_per_param_ratio']:7.3f}"
                 if "speedup" in gd else f" {'-':>11s}")
        print(f"{r['name']:22s} {r['achieved_ratio']:7.3f} {r['param_ratio']:8.3f} {p['tokens_per_s']:13.0f} "
              f"{p['speedup']:7.3f} {p['speedup_per_param_ratio']:7.3f} {d['tokens_per_s']:12.1f} "
              f"{d['speedup']:7.3f} {d['speedup_per_param_ratio']:7.3f}" + graph)


def throughput_args(p) -> None:
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--prefill-seq", type=int, default=2048)
    p.add_argument("--decode-prompt", type=int, default=128)
    p.add_argument("--decode-new", type=int, default=128)
    p.add_argument("--mlp-multiple", type=int, default=1,
                   help="keep MLP channels in multiples of this (plan_from_rates; the package default is 1)")


def shrink_for_tiny(args) -> None:
    """--tiny: small shapes everywhere, so the smoke test takes seconds."""
    for name, small in (("seq_len", 64), ("batch_size", 2), ("eval_tokens", 512), ("calibration_seq_len", 64),
                        ("prefill_batch", 2), ("prefill_seq", 64), ("decode_prompt", 8), ("decode_new", 8)):
        if hasattr(args, name):
            setattr(args, name, min(getattr(args, name), small))
