"""Throughput of a model on the GPU, the same for every benchmark that measures one: prefill, greedy
decode (eager and CUDA-graph) at several batch sizes, peak memory, where prefill time goes, and the
speedups over dense divided by the parameter ratio."""

from __future__ import annotations

import statistics
import time

import torch

from _common import batches, sync, timed


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    """torch.cuda.max_memory_allocated since the last reset_peak(), GiB (None on the CPU)."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


@torch.no_grad()
def prefill_throughput(model, *, batch: int, seq: int, vocab: int, warmup: int = 1, repeats: int = 3) -> dict:
    """Tokens/s of one forward over [batch, seq] (no cache, logits of the last position only).
    Out of GPU memory, the batch is halved until it fits; `oom_batches` records the ones that did not."""
    device = next(model.parameters()).device
    oom = []
    while True:
        reset_peak()
        ids = torch.randint(vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
        try:
            med, times, _ = timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1).logits,
                                  warmup=warmup, repeats=repeats)
            break
        except torch.cuda.OutOfMemoryError:
            del ids
            oom.append(batch)
            if batch == 1:
                raise
            print(f"prefill batch {batch} x {seq}: out of GPU memory, trying {batch // 2}", flush=True)
            batch //= 2
    return {"batch": batch, "seq": seq, "median_s": med, "times_s": times, "tokens_per_s": batch * seq / med,
            "oom_batches": oom, "peak_gib": peak_gib()}


@torch.no_grad()
def decode_throughput(model, *, prompt: int, new: int, vocab: int, repeats: int = 3, batch: int = 1) -> dict:
    """Greedy decode of `batch` sequences with the KV cache (generate): new tokens per second over
    the batch, the prompt's prefill taken out as (time for `new` tokens - time for 1 token) / (new - 1)."""
    device = next(model.parameters()).device
    reset_peak()
    ids = torch.randint(vocab, (batch, prompt), generator=torch.Generator().manual_seed(2)).to(device)

    def gen(n):
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)

    t1, _, _ = timed(lambda: gen(1), warmup=1, repeats=repeats)
    tn, times, out = timed(lambda: gen(new), warmup=1, repeats=repeats)
    assert out.shape == (batch, prompt + new), out.shape
    per_token = (tn - t1) / (new - 1)
    return {"batch": batch, "prompt": prompt, "new": new, "median_s": tn, "times_s": times, "first_token_s": t1,
            "ms_per_token": 1e3 * per_token, "tokens_per_s": batch / per_token, "tokens": out[0, prompt:].tolist(),
            "peak_gib": peak_gib()}


@torch.no_grad()
def decode_graph(model, *, prompt: int, new: int, vocab: int, repeats: int = 3, graph: bool = True,
                 batch: int = 1) -> dict:
    """Greedy decode of `batch` sequences with a static KV cache, each step replayed as one CUDA graph
    (no per-kernel launch cost): what the weights' size allows, unlike eager HF decode."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    reset_peak()
    ids = torch.randint(vocab, (batch, prompt), generator=torch.Generator().manual_seed(2)).to(device)
    cache = StaticCache(config=model.config, max_cache_len=prompt + new)
    tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)
    hist = torch.zeros(batch, new, dtype=torch.long, device=device)

    def step():
        logits = model(input_ids=tok, past_key_values=cache, cache_position=pos,
                       position_ids=pos[None].expand(batch, 1), use_cache=True, logits_to_keep=1).logits
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
    return {"batch": batch, "prompt": prompt, "new": new, "graph": graph, "times_s": times[1:],
            "ms_per_token": 1e3 * per_token, "tokens_per_s": batch / per_token, "tokens": hist[0].tolist(),
            "peak_gib": peak_gib()}


@torch.no_grad()
def prefill_split(model, *, batch: int, seq: int, repeats: int = 3, max_layers: int = 8) -> dict:
    """Where a prefill's time goes: in up to `max_layers` evenly spaced blocks, the attention (with
    its RMSNorm; RoPE and SDPA inside) and the MLP (with its RMSNorm) timed apart on random hidden
    states of [batch, seq], and each projection's GEMM alone (ms and TFLOP/s). Per-block means are
    scaled by the number of blocks; what the whole prefill takes beyond them is the part pruning does
    not shrink (embedding, residual adds, final norm, LM head of the last position, Python)."""
    dec = model.get_decoder()
    layers = dec.layers
    n = len(layers)
    idx = sorted({round(i * (n - 1) / max(min(max_layers, n) - 1, 1)) for i in range(min(max_layers, n))})
    p = next(model.parameters())
    x = torch.randn(batch, seq, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    x = x.to(p.device, p.dtype)
    pe = dec.rotary_emb(x, torch.arange(seq, device=p.device)[None].expand(batch, -1))
    ms = lambda fn: 1e3 * timed(fn, warmup=1, repeats=repeats)[0]  # noqa: E731
    tokens = batch * seq
    rows = []
    for i in idx:
        layer = layers[i]
        a, m = layer.self_attn, layer.mlp
        r = {"layer": i,
             "attention_ms": ms(lambda: a(hidden_states=layer.input_layernorm(x), position_embeddings=pe,
                                          attention_mask=None)[0]),
             "mlp_ms": ms(lambda: m(layer.post_attention_layernorm(x)))}
        gemms = {}
        for name, lin in (("q", getattr(a, "q_proj", None)), ("k", getattr(a, "k_proj", None)),
                          ("v", getattr(a, "v_proj", None)), ("o", a.o_proj), ("gate", m.gate_proj),
                          ("up", m.up_proj), ("down", m.down_proj)):
            if lin is None or lin.weight.numel() == 0:
                continue
            inp = torch.empty(batch, seq, lin.in_features, device=p.device, dtype=p.dtype).normal_()
            t = ms(lambda: lin(inp))
            gemms[name] = {"shape": list(lin.weight.shape), "ms": t,
                           "tflops": 2 * tokens * lin.weight.numel() / t / 1e9}
            del inp
        r["gemms"] = gemms
        r["attention_gemm_ms"] = sum(v["ms"] for k, v in gemms.items() if k in "qkvo")
        r["mlp_gemm_ms"] = sum(v["ms"] for k, v in gemms.items() if k in ("gate", "up", "down"))
        rows.append(r)
    mean = lambda k: statistics.fmean(r[k] for r in rows)  # noqa: E731
    out = {"batch": batch, "seq": seq, "layers_timed": idx, "layers": rows,
           "blocks_ms": {k.removesuffix("_ms"): n * mean(k)
                         for k in ("attention_ms", "attention_gemm_ms", "mlp_ms", "mlp_gemm_ms")}}
    b = out["blocks_ms"]
    b["attention_other"] = b["attention"] - b["attention_gemm"]  # SDPA, RoPE, norm, reshapes
    b["mlp_other"] = b["mlp"] - b["mlp_gemm"]  # SiLU, product, norm
    return out


def decode_keys(batch: int) -> tuple[str, str]:
    """Row keys of eager and graph decode at `batch` (batch 1 keeps the names of the earlier runs)."""
    return ("decode", "decode_graph") if batch == 1 else (f"decode_b{batch}", f"decode_graph_b{batch}")


def measure(row: dict, model, args, name: str) -> dict:
    """Prefill, eager and graph decode at each of args.decode_batches (and, with args.split, where
    prefill time goes) into `row`; graph decode only on a GPU, and its failure is recorded, not raised."""
    v = model.config.vocab_size
    row["prefill"] = prefill_throughput(model, batch=args.prefill_batch, seq=args.prefill_seq, vocab=v,
                                        repeats=args.repeats)
    if row["prefill"]["batch"] != args.prefill_batch:  # the rows after this one prefill the batch that fitted
        print(f"{name}: prefill batch {args.prefill_batch} did not fit; {row['prefill']['batch']} from now on",
              flush=True)
        args.prefill_batch = row["prefill"]["batch"]
    if getattr(args, "split", False):
        row["prefill_split"] = prefill_split(model, batch=row["prefill"]["batch"], seq=args.prefill_seq,
                                             repeats=args.repeats)
        row["prefill_split"]["outside_blocks_ms"] = (1e3 * row["prefill"]["median_s"]
                                                     - row["prefill_split"]["blocks_ms"]["attention"]
                                                     - row["prefill_split"]["blocks_ms"]["mlp"])
    eager_batches = getattr(args, "eager_batches", None)
    for b in batches(getattr(args, "decode_batches", "1")):
        eager, graph = decode_keys(b)
        if eager_batches is None or b in batches(eager_batches):
            row[eager] = decode_throughput(model, prompt=args.decode_prompt, new=args.decode_new, vocab=v,
                                           repeats=args.repeats, batch=b)
        if torch.cuda.is_available():
            try:
                gd = decode_graph(model, prompt=args.decode_prompt, new=args.decode_new, vocab=v,
                                  repeats=args.repeats, batch=b)
                if eager in row:
                    same = [a == c for a, c in zip(gd["tokens"], row[eager]["tokens"])]
                    gd["tokens_same_as_generate"] = f"{sum(same)}/{len(same)}, first {same.index(False) if False in same else len(same)} in a row"
                row[graph] = gd
            except Exception as e:  # an optional measurement: record why it failed, go on
                row[graph] = {"failed": f"{type(e).__name__}: {e}"}
                print(f"graph decode at batch {b} failed for {name}: {type(e).__name__}: {e}", flush=True)
    return row


def throughput_row(name: str, model, plan, geometry, args) -> dict:
    """Prefill and decode throughput of one standalone model (plan None: dense)."""
    kept = geometry.prunable_params if plan is None else plan.kept_params
    row = {"name": name, "kept_block_params": kept, "param_ratio": geometry.prunable_params / kept,
           "achieved_ratio": 0.0 if plan is None else plan.achieved_ratio}
    return measure(row, model, args, name)


def add_speedups(rows: list[dict]) -> None:
    """speedup (tokens/s over dense's) and speedup / param_ratio of every measurement of every row."""
    dense = next(r for r in rows if r["name"] == "dense")
    for r in rows:
        for kind, m in r.items():
            if not isinstance(m, dict) or "tokens_per_s" not in m or "tokens_per_s" not in dense.get(kind, {}):
                continue
            s = m["tokens_per_s"] / dense[kind]["tokens_per_s"]
            m["speedup"] = s
            m["speedup_per_param_ratio"] = s / r["param_ratio"]


def print_throughput(rows: list[dict]) -> None:
    """One line per model: tokens/s, speedup and speedup / params x of each measurement dense has."""
    kinds = [k for k, m in rows[0].items() if isinstance(m, dict) and "tokens_per_s" in m]
    head = f"{'model':22s} {'removed':>7s} {'params x':>8s}"
    for k in kinds:
        head += f" | {k + ' tok/s':>19s} {'speedup':>7s} {'/params':>7s}"
    print(head)
    for r in rows:
        line = f"{r['name']:22s} {r['achieved_ratio']:7.3f} {r['param_ratio']:8.3f}"
        for k in kinds:
            m = r.get(k, {})
            line += (f" | {m['tokens_per_s']:19.1f} {m['speedup']:7.3f} {m['speedup_per_param_ratio']:7.3f}"
                     if "speedup" in m else f" | {'-':>19s} {'-':>7s} {'-':>7s}")
        print(line)


def print_split(rows: list[dict]) -> None:
    """Where prefill time goes, per model (rows measured with args.split)."""
    rows = [r for r in rows if "prefill_split" in r]
    if not rows:
        return
    print(f"\nprefill split, ms over all blocks (from {len(rows[0]['prefill_split']['layers_timed'])} timed blocks): "
          "attention = its GEMMs + other (SDPA, RoPE, norm); mlp = GEMMs + other (SiLU, product, norm)")
    print(f"{'model':22s} {'prefill':>8s} {'attn':>8s} {'a.gemm':>8s} {'a.other':>8s} {'mlp':>8s} {'m.gemm':>8s} "
          f"{'m.other':>8s} {'outside':>8s} {'q TF/s':>7s} {'o TF/s':>7s} {'up TF/s':>7s} {'dn TF/s':>7s}")
    for r in rows:
        s, b = r["prefill_split"], r["prefill_split"]["blocks_ms"]
        g = s["layers"][0]["gemms"]
        tf = lambda k: f"{g[k]['tflops']:7.0f}" if k in g else f"{'-':>7s}"  # noqa: E731
        print(f"{r['name']:22s} {1e3 * r['prefill']['median_s']:8.1f} {b['attention']:8.1f} {b['attention_gemm']:8.1f} "
              f"{b['attention_other']:8.1f} {b['mlp']:8.1f} {b['mlp_gemm']:8.1f} {b['mlp_other']:8.1f} "
              f"{s['outside_blocks_ms']:8.1f} {tf('q')} {tf('o')} {tf('up')} {tf('down')}")


def throughput_args(p) -> None:
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--prefill-seq", type=int, default=2048)
    p.add_argument("--decode-prompt", type=int, default=128)
    p.add_argument("--decode-new", type=int, default=128)
    p.add_argument("--decode-batches", default="1,16", help="decode batch sizes, comma-separated")
    p.add_argument("--eager-batches", default=None,
                   help="those of --decode-batches also decoded with eager generate (default: all); "
                        "graph decode, on a GPU, runs at all of them")
    p.add_argument("--mlp-multiple", type=int, default=1,
                   help="keep MLP channels in multiples of this (plan_from_rates; the package default is 1)")
