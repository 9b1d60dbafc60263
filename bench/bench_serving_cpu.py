"""Generation throughput on the CPU: vLLM (with the selfpruner plugin) against transformers,
for the dense demo model and its pruned export, at batch 1 and 8.

The pruned model is SmolLM2-135M with section 4's searched rates at β = 0.3 (blocks of
different sizes, so vLLM serves it through `selfpruner.serve`). Each run: prompts of
`--prompt-tokens` tokens, `--new-tokens` generated greedily, end-of-sequence ignored; tokens/s
counts generated tokens over the whole call (prefill included), median of `--repeats` after a
warm-up. float32, both engines on every core. vLLM runs in its own environment (.venv-serve,
`make serve-env`); this script starts it there.

    PYTHONPATH=pruner_image .venv/bin/python bench/bench_serving_cpu.py --out bench/results/cpu_serving.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVE_PYTHON = ROOT / ".venv-serve" / "bin" / "python"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--search-results", default="bench/results/h200_search_classical.json",
                   help="section 4's results, whose genetic best at --ratio is the pruned model")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vllm-modes", default="eager,compiled",
                   help="eager: --enforce-eager; compiled: vLLM's default (torch.compile, a long warm-up)")
    p.add_argument("--workdir", default="runs/bench_serving")
    p.add_argument("--out", default=None)
    p.add_argument("--vllm-worker", default=None, help=argparse.SUPPRESS)  # internal: run in .venv-serve
    return p.parse_args(argv)


def prompts(n: int, length: int, vocab: int = 49152) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() after one warm-up call (bench/_common.py, in either environment)."""
    from _common import timed as median_timed

    return median_timed(fn, repeats=repeats)[0]


def vllm_worker(job_path: str) -> int:
    import gc

    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory
    from vllm.inputs import TokensPrompt

    job = json.loads(Path(job_path).read_text())
    out = {}
    for mode in job["modes"]:
        for name, folder in job["models"].items():
            start = time.perf_counter()
            llm = LLM(model=folder, dtype="float32", seed=0, max_model_len=1024, enforce_eager=mode == "eager",
                      distributed_executor_backend="uni")
            load = time.perf_counter() - start
            params = SamplingParams(max_tokens=job["new_tokens"], min_tokens=job["new_tokens"], temperature=0,
                                    ignore_eos=True)
            row = out.setdefault(mode, {})[name] = {"load_s": round(load, 1)}
            for b in job["batches"]:
                batch = [TokensPrompt(prompt_token_ids=p) for p in prompts(b, job["prompt_tokens"])]
                sec = timed(lambda llm=llm, batch=batch: llm.generate(batch, params, use_tqdm=False), job["repeats"])
                row[str(b)] = {"seconds": sec, "tokens_per_s": b * job["new_tokens"] / sec}
            llm.llm_engine.engine_core.shutdown()  # before the next engine starts (as tests/vllm_worker.py does)
            del llm
            gc.collect()
            cleanup_dist_env_and_memory()

    import vllm

    Path(job["result"]).write_text(json.dumps({"vllm": vllm.__version__, "models": out}))
    return 0


def hf_run(folders: dict, a, batches: list[int]) -> dict:
    import torch

    from selfpruner import model_source

    out = {}
    for name, folder in folders.items():
        model = model_source.load(folder).model
        out[name] = {}
        for b in batches:
            x = torch.tensor(prompts(b, a.prompt_tokens))
            mask = torch.ones_like(x)

            def gen():
                with torch.no_grad():
                    y = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=a.new_tokens,
                                       min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
                assert y.shape[1] == a.prompt_tokens + a.new_tokens

            sec = timed(gen, a.repeats)
            out[name][str(b)] = {"seconds": sec, "tokens_per_s": b * a.new_tokens / sec}
    return out


def prepare(a) -> dict:
    """The dense demo folder and the pruned export (made once)."""
    from selfpruner import engine, export, model_source, structure
    from selfpruner.architecture import geometry_of

    dense, _ = model_source.resolve("demo")
    pruned = Path(a.workdir) / f"smollm2-searched-{a.ratio}"
    if not (pruned / "config.json").is_file():
        results = Path(a.search_results)
        runs = json.loads((results if results.is_absolute() else ROOT / results).read_text())["runs"]
        [run] = [r for r in runs if r["strategy"] == "genetic" and r["fidelity"] == "full" and r["ratio"] == a.ratio]
        settings = engine.PruneSettings(metric="wanda-sp", bias_compensation=True, calibration_windows=32,
                                        calibration_seq_len=512)
        prepared = engine.prepare("demo", settings, device="cpu", progress=False)
        g = geometry_of(prepared.loaded.model.config)
        prepared.pm.apply(structure.plan_from_rates(g, structure.Rates.parse(run["rates"], g.num_layers)))
        export.export(prepared.pm, prepared.loaded.tokenizer, pruned, info={"rates": run["rates"]}, force=True)
    return {"dense": str(dense), f"searched {a.ratio}": str(pruned)}


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.vllm_worker:
        return vllm_worker(a.vllm_worker)
    import torch

    batches = [int(b) for b in a.batches.split(",")]
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    folders = prepare(a)
    job = Path(a.workdir) / "vllm_job.json"
    result = Path(a.workdir) / "vllm_result.json"
    job.write_text(json.dumps({"models": folders, "batches": batches, "prompt_tokens": a.prompt_tokens,
                               "new_tokens": a.new_tokens, "repeats": a.repeats, "result": str(result),
                               "modes": a.vllm_modes.split(",")}))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1", "PYTHONPATH": ""}
    subprocess.run([str(SERVE_PYTHON), __file__, "--vllm-worker", str(job)], check=True, env=env)
    served = json.loads(result.read_text())
    vllm = served["models"]
    hf = hf_run(folders, a, batches)
    modes = a.vllm_modes.split(",")
    print(f"{'model':<16}{'batch':>6}{'transformers':>14}" + "".join(f"{'vLLM ' + m:>16}{'/ tf':>7}" for m in modes)
          + "   (generated tokens/s)")
    for name in folders:
        for b in batches:
            t = hf[name][str(b)]["tokens_per_s"]
            line = f"{name:<16}{b:>6}{t:>14.1f}"
            for m in modes:
                v = vllm[m][name][str(b)]["tokens_per_s"]
                line += f"{v:>16.1f}{v / t:>6.2f}x"
            print(line)
    if a.out:
        Path(a.out).write_text(json.dumps({
            "args": vars(a), "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "vllm": served["vllm"],
            "transformers_results": hf, "vllm_results": vllm}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
