"""Runs in the serving environment (.venv-serve, with vLLM), started by tests/test_serving.py.

    python vllm_worker.py JOB.json RESULT.json

JOB.json: {"engine": {LLM keyword arguments}, "cases": [{"dir", "score": [[token ids]],
"greedy": [[token ids]], "new_tokens"}]}. Each checkpoint is loaded in turn with vLLM's offline
API, in one process (an engine load is the slow part), and gives: the log-prob of every token
of each `score` prompt after the first, and the greedy continuation of each `greedy` prompt.
RESULT.json holds one entry per case.
"""

import gc
import json
import sys
import time


def run(llm, case: dict) -> dict:
    from vllm import SamplingParams

    score = [{"prompt_token_ids": ids} for ids in case["score"]]
    # prompt_logprobs=0: each position's dict holds just the prompt's own token
    scored = llm.generate(score, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), use_tqdm=False)
    logprobs = [[entry[tok].logprob for tok, entry in zip(ids[1:], out.prompt_logprobs[1:])]
                for ids, out in zip(case["score"], scored)]
    greedy = [{"prompt_token_ids": ids} for ids in case["greedy"]]
    params = SamplingParams(max_tokens=case["new_tokens"], temperature=0, ignore_eos=True)
    generated = llm.generate(greedy, params, use_tqdm=False)
    return {"prompt_logprobs": logprobs, "greedy": [list(out.outputs[0].token_ids) for out in generated]}


def main(job_path: str, result_path: str) -> None:
    from vllm import LLM
    from vllm.distributed import cleanup_dist_env_and_memory

    with open(job_path) as f:
        job = json.load(f)
    results = []
    for case in job["cases"]:
        start = time.perf_counter()
        llm = LLM(model=case["dir"], dtype="float32", seed=0, **job.get("engine", {}))
        load_s = time.perf_counter() - start
        results.append({"dir": case["dir"], "load_s": load_s, **run(llm, case),
                        "run_s": time.perf_counter() - start - load_s})
        llm.llm_engine.engine_core.shutdown()  # before the next checkpoint's engine starts
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
    with open(result_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":  # vLLM's engine processes may re-import the main module
    main(*sys.argv[1:])
