"""Models split over devices, and a 34B-class model through the whole run on one GPU.

Why: the sharding work claims that a model split over devices computes what the unsplit model
computes, that the split costs little on the hot path, and that a model as large as one GPU goes
through calibration, search and export without a host copy of itself. Three parts, each a
subcommand writing one JSON file:

  correctness  tiny Llama, Mistral and Qwen2 models in float32, their blocks split between
               cuda:0 and the CPU (both orders), against the same model on one device: logits,
               calibration statistics, the perplexity of a pruned candidate and the exported
               checkpoint.
  overhead     a LLaMA-2-7B-shaped bf16 model evaluated plain (one device, no hooks) and split
               over [cuda:0, cuda:0] (accelerate's hooks before every block: everything a split
               adds on the hot path except the copies between GPUs, which one GPU cannot show),
               against the sum of its modules' forward times taken with CUDA events inside the
               plain forward; then 1 and 2 replicas on the one GPU through the local executor.
  big          a 34B-class bf16 model (CodeLlama-34B's shape: hidden 8192, intermediate 22016,
               48 layers, 64 heads, 8 KV heads) built on the GPU and saved as sharded
               safetensors, then `selfpruner run` (search.runner.run) on it: calibration, a short
               genetic search, held-out evaluation, the streaming export; host memory and GPU
               memory sampled throughout, by phase; the export reloaded and its perplexity
               checked against the search's.

    PYTHONPATH=pruner_image python3 bench/bench_sharding.py correctness --out sharding_correctness.json
    PYTHONPATH=pruner_image python3 bench/bench_sharding.py overhead --out sharding_overhead.json
    PYTHONPATH=pruner_image python3 bench/bench_sharding.py big --out sharding_34b.json
    PYTHONPATH=pruner_image .venv/bin/python bench/bench_sharding.py ... --tiny   # CPU smoke test

Without CUDA the GPU of each part is replaced by the CPU (a check of the script, not a result).
Texts are random words of a word-level tokenizer over the model's vocabulary: weights are random
too, so only time and memory mean anything, and perplexities are compared, not judged.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_model, llama_config, machine, sync, timed  # noqa: E402

GPU = "cuda:0" if torch.cuda.is_available() else "cpu"
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
BASELINE_7B = {"seconds_per_eval": 1.42, "tokens": 65536, "params": 6_738_415_616,
               "source": "the sharding issue: selfpruner run, LLaMA-2-7B shape, bf16, H200, before the split"}


# -- shared pieces -----------------------------------------------------------------------------------
def word_tokenizer(vocab_size: int):
    """Words w0 … w{V-3} plus <s> and </s>: every id of the model's vocabulary is reachable."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(vocab_size - 2)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def char_tokenizer():
    """Letters and digits, one token each, no pre-tokenizer to speak of: transformers loads a Qwen2
    folder's tokenizer as its own BPE class, which keeps such a vocabulary's ids but not words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(LETTERS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def random_chars(n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return "".join(LETTERS[i] for i in torch.randint(0, len(LETTERS), (n,), generator=g).tolist())


def random_words(vocab_size: int, n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size - 2, (n,), generator=g).tolist()
    return " ".join(f"w{i}" for i in ids)


def save_model(model, tokenizer, folder: Path, shard: str = "5GB") -> float:
    """Save as sharded safetensors; seconds taken."""
    t = time.perf_counter()
    model.save_pretrained(folder, max_shard_size=shard)
    tokenizer.save_pretrained(folder)
    return time.perf_counter() - t


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def gpu_peak() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"max_allocated_bytes": torch.cuda.max_memory_allocated(),
            "max_reserved_bytes": torch.cuda.max_memory_reserved()}


class MemorySampler:
    """Host memory of this process (VmRSS and its anonymous / file / shared parts, from
    /proc/self/status) and GPU memory, sampled every `every` seconds in a thread, each sample
    tagged with the phase set by `phase(name)`: the peak of each phase, not only of the run."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")

    def __init__(self, every: float = 0.25):
        self.every, self.current = every, "start"
        self.peaks: dict[str, dict] = {}
        self.timeline: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def set(self, name: str) -> None:
        self._sample()
        self.current = name

    @contextmanager
    def phase(self, name: str):
        before = self.current
        self.set(name)
        try:
            yield
        finally:
            self.set(before)

    def _read(self) -> dict:
        out = {}
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in self.FIELDS:
                    out[key] = int(value.split()[0]) * 1024
        except OSError:
            pass
        if torch.cuda.is_available():
            out["gpu_allocated"] = torch.cuda.memory_allocated()
            out["gpu_reserved"] = torch.cuda.memory_reserved()
        return out

    def _sample(self) -> None:
        s = self._read()
        peak = self.peaks.setdefault(self.current, {})
        for k, v in s.items():
            peak[k] = max(peak.get(k, 0), v)
        if not self.timeline or time.time() - self.timeline[-1]["t"] >= 5:
            self.timeline.append({"t": time.time(), "phase": self.current, **s})

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()


def _tiny_configs(layers: int = 4) -> dict:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=False)
    return {"llama-gqa": LlamaConfig(**common, attention_bias=True),
            "mistral-gqa": MistralConfig(**common, sliding_window=None),
            "qwen2-gqa": Qwen2Config(**common)}


# -- correctness -------------------------------------------------------------------------------------
def correctness(args) -> dict:
    from transformers import AutoModelForCausalLM

    from selfpruner import calibration, corpus, engine, evaluate, export, model_source, structure

    work = Path(args.workdir) / "correctness"
    shutil.rmtree(work, ignore_errors=True)
    orders = {"gpu-then-cpu": [GPU, "cpu"], "cpu-then-gpu": ["cpu", GPU]}
    rows = []
    for arch, config in _tiny_configs().items():
        torch.manual_seed(0)
        folder = work / arch
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tok = char_tokenizer()
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        text = work / f"{arch}.txt"
        text.write_text(random_chars(6000, seed=1))
        ids = torch.randint(2, config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(2))
        eval_ids = torch.randint(2, config.vocab_size, (2048,), generator=torch.Generator().manual_seed(3))
        settings = engine.PruneSettings(metric="flap", calibration_text=str(text), calibration_windows=4,
                                        calibration_seq_len=64, mlp_multiple=1)
        single = engine.prepare(str(folder), settings, devices=["cpu"], progress=False)
        cal_ids = corpus.tokenize(single.loaded.tokenizer, text.read_text())
        ref_stats = calibration.collect(single.loaded.model, cal_ids, num_windows=4, seq_len=64, progress=False)
        g = single.pm.geometry
        plan = structure.plan_from_rates(g, structure.Rates.parse([0.2, 0.5, 0.0, 0.4], g.num_layers),
                                          head_mode=settings.head_mode, mlp_multiple=1)
        with torch.no_grad():
            ref_logits = single.loaded.model(ids).logits
        single.pm.apply(plan)
        ref_ppl = evaluate.perplexity(single.loaded.model, eval_ids, seq_len=64, batch_size=4).perplexity
        ref_sd = export.export(single.pm, single.loaded.tokenizer, work / f"{arch}-single", info={}, force=True)
        single.pm.restore()
        ref_state = model_source.load(str(ref_sd)).model.state_dict()
        for order, devices in orders.items():
            split = engine.prepare(str(folder), settings, devices=devices, progress=False)
            with torch.no_grad():
                logits = split.loaded.model(ids.to(devices[0])).logits
            # collected afresh on the split model (engine.prepare reused the single run's cached artifact)
            fresh = calibration.collect(split.loaded.model, cal_ids, num_windows=4, seq_len=64, progress=False)
            stats = max(max(rel(b.total, a.total), rel(b.total_sq, a.total_sq)) for a, b in
                        zip(ref_stats.attention + ref_stats.mlp, fresh.attention + fresh.mlp))
            split.pm.apply(plan)
            ppl = evaluate.perplexity(split.loaded.model, eval_ids, seq_len=64, batch_size=4).perplexity
            out = export.export(split.pm, split.loaded.tokenizer, work / f"{arch}-{order}", info={}, force=True)
            split.pm.restore()
            state = model_source.load(str(out)).model.state_dict()
            weights = max(rel(state[k], ref_state[k]) for k in ref_state)
            row = {"arch": arch, "order": order, "devices": devices,
                   "device_map": sorted(set(split.loaded.model.hf_device_map.values())),
                   "logits_max_abs_diff": float((logits.cpu() - ref_logits).abs().max()),
                   "logits_rel": rel(logits, ref_logits), "calibration_stats_max_rel": stats,
                   "perplexity_rel": abs(ppl - ref_ppl) / ref_ppl, "export_weights_max_rel": weights,
                   "same_tensor_names": sorted(state) == sorted(ref_state)}
            row["ok"] = (row["logits_max_abs_diff"] <= 1e-5 and row["perplexity_rel"] <= 1e-5
                         and stats <= 1e-5 and weights <= 1e-5 and row["same_tensor_names"])
            rows.append(row)
            print(f"{arch:12s} {order:13s} logits max|Δ| {row['logits_max_abs_diff']:.2e}  stats {stats:.1e}  "
                  f"ppl {row['perplexity_rel']:.1e}  export {weights:.1e}  {'ok' if row['ok'] else 'FAIL'}", flush=True)
            del split
            free()
    shutil.rmtree(work, ignore_errors=True)
    return {"part": "correctness", "rows": rows, "all_ok": all(r["ok"] for r in rows),
            "tolerance": "logits max |Δ| ≤ 1e-5 (float32); calibration statistics, perplexity and exported "
                         "weights within 1e-5 relative"}


# -- overhead ----------------------------------------------------------------------------------------
class ModuleTimer:
    """CUDA events around every decoder layer, the embedding, the final norm and the head, inside
    the real forward; the sum is the model's own compute with nothing between the modules."""

    def __init__(self, model):
        self.pairs: list[tuple[str, object, object]] = []
        self.handles = []
        base = model.model
        named = [("embed", base.embed_tokens), ("norm", base.norm), ("head", model.lm_head)]
        named += [(f"block{i}", layer) for i, layer in enumerate(base.layers)]
        for name, module in named:
            self.handles.append(module.register_forward_pre_hook(self._pre(name)))
            self.handles.append(module.register_forward_hook(self._post(name)))
        self._open: dict[str, object] = {}

    def _event(self):
        if torch.cuda.is_available():
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _pre(self, name):
        def hook(module, args):
            self._open[name] = self._event()
        return hook

    def _post(self, name):
        def hook(module, args, output):
            self.pairs.append((name, self._open.pop(name), self._event()))
        return hook

    def seconds(self) -> dict:
        sync()
        out: dict[str, float] = {}
        for name, a, b in self.pairs:
            s = a.elapsed_time(b) / 1e3 if torch.cuda.is_available() else b - a
            key = "blocks" if name.startswith("block") else name
            out[key] = out.get(key, 0.0) + s
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def overhead(args) -> dict:
    from selfpruner import engine, evaluate, memory_plan, model_source, structure
    from selfpruner.executors.base import EvalTask
    from selfpruner.executors.local import LocalExecutor

    cfg = llama_config(tiny=args.tiny)
    work = Path(args.workdir) / "overhead"
    shutil.rmtree(work, ignore_errors=True)
    folder = work / "llama-7b-shape"
    tok = word_tokenizer(cfg.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg, GPU)
    save_s = save_model(model, tok, folder)
    del model
    free()
    tokens, seq_len, batch = (2048, 128, 4) if args.tiny else (65536, 2048, 8)
    text = random_words(cfg.vocab_size, tokens + 4096, seed=5)
    eval_ids = torch.randint(2, cfg.vocab_size, (tokens,), generator=torch.Generator().manual_seed(6))
    settings = engine.PruneSettings(metric="magnitude", bias_compensation=False, head_mode="kv-group",
                                    mlp_multiple=1 if args.tiny else 128)
    work_plan = memory_plan.Workload(dtype="bfloat16", batch_size=batch, seq_len=seq_len, head_mode="kv-group")
    result = {"part": "overhead", "shape": cfg.to_dict() if args.tiny else "LLaMA-2-7B", "tokens_per_eval": tokens,
              "seq_len": seq_len, "batch_size": batch, "save_s": save_s, "variants": {}}

    def measure(eng, name):
        g = eng.pm.geometry
        row = {}
        for label, rate in (("dense", None), ("uniform-0.3", 0.3)):
            if rate is not None:
                eng.pm.apply(structure.plan_from_rates(g, structure.Rates.uniform(rate, g.num_layers),
                                                       head_mode="kv-group", mlp_multiple=settings.mlp_multiple))
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            med, times, out = timed(lambda: evaluate.perplexity(eng.loaded.model, eval_ids, seq_len=seq_len,
                                                                  batch_size=batch), warmup=1, repeats=3)
            row[label] = {"median_s": med, "times_s": times, "perplexity": out.perplexity,
                          "tokens_per_s": out.tokens / med, **gpu_peak()}
            if name == "plain":  # the modules' own time, inside one more forward
                timer = ModuleTimer(eng.loaded.model)
                evaluate.perplexity(eng.loaded.model, eval_ids, seq_len=seq_len, batch_size=batch)
                row[label]["module_seconds"] = timer.seconds()
                timer.remove()
            if rate is not None:
                eng.pm.restore()
            print(f"{name:6s} {label:12s} {med:.3f} s/eval  ({out.tokens / med:,.0f} tokens/s)", flush=True)
        return row

    plain = engine.build(engine.load(str(folder), dtype="bfloat16", devices=[GPU]), settings, progress=False)
    result["variants"]["plain"] = measure(plain, "plain")
    del plain
    free()
    split = engine.build(engine.load(str(folder), dtype="bfloat16", devices=[GPU, GPU], workload=work_plan),
                         settings, progress=False)
    assert all(hasattr(layer, "_hf_hook") for layer in split.loaded.model.model.layers)
    result["variants"]["split-hooks"] = measure(split, "split")
    del split
    free()
    for label in ("dense", "uniform-0.3"):
        p, s = result["variants"]["plain"][label], result["variants"]["split-hooks"][label]
        modules = sum(p["module_seconds"].values())
        result[f"ratios_{label}"] = {"split_over_plain": s["median_s"] / p["median_s"],
                                     "split_over_module_sum": s["median_s"] / modules,
                                     "plain_over_module_sum": p["median_s"] / modules}
    config = model_source.load_config(str(folder))
    gpu_mem = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    result["memory_plan_one_gpu"] = memory_plan.plan(config, work_plan, gpus=1, gpu_memory=gpu_mem).to_dict()

    # replicas on one GPU: both share its streams and arithmetic, so this shows what the replica
    # machinery costs (threads, one lock each), not the scaling, which needs several GPUs
    rates = [structure.Rates.uniform(0.3, cfg.num_hidden_layers).to_json()] * (2 if args.tiny else 8)
    tasks = [EvalTask(rates=r, tokens=tokens) for r in rates]
    result["replicas"] = {}
    for n in (1, 2):
        ex = LocalExecutor(str(folder), settings, {"fitness": text}, dtype="bfloat16", seq_len=seq_len,
                           batch_size=batch, devices=[GPU] * n, progress=False, gpus_per_replica=1)
        ex.evaluate(tasks[:n])  # warm-up of every replica
        sync()
        t = time.perf_counter()
        outcomes = ex.evaluate(tasks)
        sync()
        wall = time.perf_counter() - t
        errors = [o.error for o in outcomes if o.error]
        result["replicas"][str(n)] = {"candidates": len(tasks), "wall_s": wall, "candidates_per_s": len(tasks) / wall,
                                      "errors": errors}
        print(f"{n} replica(s) on one device: {len(tasks) / wall:.3f} candidates/s {errors or ''}", flush=True)
        del ex
        free()
    result["replicas"]["two_over_one"] = (result["replicas"]["2"]["candidates_per_s"]
                                          / result["replicas"]["1"]["candidates_per_s"])
    shutil.rmtree(work, ignore_errors=True)
    return result


# -- big ---------------------------------------------------------------------------------------------
def big_config(layers: int, tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        kw = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=layers, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=512)
    else:  # CodeLlama-34B
        kw = dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=layers, num_attention_heads=64,
                  num_key_value_heads=8, vocab_size=32000)
    return LlamaConfig(max_position_embeddings=16384, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       attn_implementation="sdpa", **kw)


def _free_bytes(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free


def big(args) -> dict:
    from selfpruner import evaluate, export as export_mod, calibration, memory_plan, model_source, spec
    from selfpruner.search import runner

    source_root, out_root = Path(args.source_dir), Path(args.workdir) / "big"
    shutil.rmtree(source_root / "big-source", ignore_errors=True)
    shutil.rmtree(out_root, ignore_errors=True)
    layers = args.layers or (4 if args.tiny else 48)
    cfg = big_config(layers, args.tiny)
    size = memory_plan.ModelSize.of(cfg)
    per_block = 2 * size.block_params
    # the source checkpoint and the pruned export (about 0.7 of it at β = 0.3) must both fit their disks
    free_src, free_out = _free_bytes(source_root), _free_bytes(out_root)
    fixed = 2 * (size.total_params - layers * size.block_params)
    fit_src = (free_src * 0.92 - fixed) // per_block
    fit_out = (free_out * 0.92 - fixed) // (0.75 * per_block)
    if source_root.resolve() == out_root.resolve() or os.stat(source_root).st_dev == os.stat(out_root).st_dev:
        fit_src = (free_src * 0.92 - 2 * fixed) // (1.75 * per_block)
        fit_out = fit_src
    if min(fit_src, fit_out) < layers:
        layers = int(max(2, min(fit_src, fit_out)))
        print(f"disk: {free_src / 1e9:.0f} GB free for the source, {free_out / 1e9:.0f} GB for the export: "
              f"{layers} layers", flush=True)
        cfg = big_config(layers, args.tiny)
        size = memory_plan.ModelSize.of(cfg)
    folder = source_root / "big-source"
    tok = word_tokenizer(cfg.vocab_size)
    result = {"part": "big", "layers": layers, "params": size.total_params,
              "disk_free_bytes": {"source": free_src, "export": free_out},
              "source_dir": str(folder), "output_dir": str(out_root)}
    torch.manual_seed(0)
    t = time.perf_counter()
    model = build_model(cfg, GPU)
    sync()
    result["build_s"] = time.perf_counter() - t
    result["save_s"] = save_model(model, tok, folder)
    del model
    free()
    print(f"built {size.total_params / 1e9:.2f}B parameters in {result['build_s']:.0f} s, saved in "
          f"{result['save_s']:.0f} s", flush=True)
    texts = {}
    small = args.tiny
    cal_windows, seq = (8, 128) if small else (128, 2048)
    fit_tokens = 2048 if small else 65536
    for name, n, seed in (("calibration", cal_windows * seq + 64, 11), ("fitness", fit_tokens + 64, 12),
                          ("heldout", fit_tokens + 64, 13)):
        p = out_root / f"{name}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(random_words(cfg.vocab_size, n, seed))
        texts[name] = str(p)
    doc = {"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob", "metadata": {"name": "bench-34b"},
           "spec": {"model": {"source": str(folder), "dtype": "bfloat16"},
                    "target": {"ratio": 0.3, "minRate": 0.0, "maxRate": 0.6},
                    "pruning": {"metric": "flap", "biasCompensation": True},
                    "calibration": {"text": texts["calibration"], "windows": cal_windows, "seqLen": seq},
                    "fitness": {"text": texts["fitness"], "seqLen": seq, "tokens": fit_tokens,
                                "heldOutText": texts["heldout"], "heldOutTokens": fit_tokens,
                                "batchSize": 8},
                    "search": {"strategy": "genetic", "population": args.population, "generations": args.generations,
                               "crossovers": args.offspring // 2, "mutations": args.offspring - args.offspring // 2,
                               "seed": 0, "baselines": ["uniform"]},
                    "output": {"path": str(out_root / "run")}}}
    job = spec.parse(doc)
    result["spec"] = doc["spec"]
    phases: dict[str, float] = {}

    def wrap(module, name, phase):
        real = getattr(module, name)

        def timed_call(*a, **kw):
            t0 = time.perf_counter()
            with sampler.phase(phase):
                try:
                    return real(*a, **kw)
                finally:
                    sync()
                    phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - t0
        setattr(module, name, timed_call)
        return real

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    with MemorySampler() as sampler:
        sampler.set("search")
        originals = [(calibration, "calibrate", wrap(calibration, "calibrate", "calibration")),
                     (export_mod, "export", wrap(export_mod, "export", "export")),
                     (model_source, "load", wrap(model_source, "load", "load")),
                     (evaluate, "perplexity", wrap(evaluate, "perplexity", "evaluation"))]
        try:
            run_result = runner.run(job, progress=True, out_dir=out_root / "run")
        finally:
            for module, name, real in originals:
                setattr(module, name, real)
        sampler.set("reload")
        result["run_wall_s"] = time.perf_counter() - t
        result["gpu_peak_run"] = gpu_peak()
        free()
        # the export, loaded as a user would, gives the search's perplexity on the fitness text
        history = [json.loads(line) for line in (out_root / "run" / "history.jsonl").read_text().splitlines()]
        full = [h for h in history if h.get("fitness") is not None and h.get("text") == "fitness"
                and h.get("tokens_budget") == fit_tokens]
        checkpoint = run_result.get("checkpoint") or str(out_root / "run" / "checkpoint")
        reloaded = model_source.load(checkpoint, dtype="bfloat16", device=GPU)
        tok_ids = torch.tensor(reloaded.tokenizer(Path(texts["fitness"]).read_text(), add_special_tokens=False)
                               ["input_ids"])
        again = evaluate.perplexity(reloaded.model, tok_ids, seq_len=seq, max_tokens=fit_tokens, batch_size=8)
        del reloaded
        free()
    result["phases_s"] = phases
    result["peaks_by_phase"] = sampler.peaks
    result["timeline"] = sampler.timeline
    result["memory_plan"] = run_result.get("memory_plan")
    best = run_result.get("best") or {}
    result["best"] = {k: best.get(k) for k in ("fitness", "held_out_perplexity", "achieved_ratio")}
    result["dense"] = run_result.get("dense")
    result["cost"] = run_result.get("cost")
    result["reloaded_perplexity"] = again.perplexity
    result["evaluations"] = len(full)
    secs = [h["seconds"] for h in full if h.get("seconds")]
    result["seconds_per_eval"] = {"median": statistics.median(secs) if secs else None,
                                  "min": min(secs) if secs else None, "max": max(secs) if secs else None}
    scale = size.total_params / BASELINE_7B["params"]
    result["baseline_7b"] = {**BASELINE_7B, "scaled_to_this_model_s": BASELINE_7B["seconds_per_eval"] * scale,
                             "params_ratio": scale}
    ckpt = Path(checkpoint)
    result["checkpoint_bytes"] = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    result["checkpoint_files"] = sorted(p.name for p in ckpt.glob("*.safetensors"))
    result["result_json_keys"] = sorted(run_result)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(ckpt, ignore_errors=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=("correctness", "overhead", "big"))
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke test of the script")
    p.add_argument("--workdir", default="runs/bench_sharding", help="models, texts and runs (deleted after)")
    p.add_argument("--source-dir", default="runs/bench_sharding", help="big: where the source checkpoint goes")
    p.add_argument("--layers", type=int, default=0, help="big: blocks (0: 48, fewer if the disks are short)")
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--generations", type=int, default=1)
    p.add_argument("--offspring", type=int, default=8, help="crossovers + mutations per generation")
    p.add_argument("--keep", action="store_true", help="big: keep the source and the checkpoint")
    args = p.parse_args(argv)
    started = time.time()
    result = {"correctness": correctness, "overhead": overhead, "big": big}[args.part](args)
    result.update(machine=machine(), date=time.strftime("%Y-%m-%d"), wall_s=time.time() - started,
                  command=" ".join(sys.argv))
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
