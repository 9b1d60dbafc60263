"""Models split over several devices: the split path against the single-device path on tiny
real models (every block's device is the CPU here, with accelerate's hooks moving the inputs
exactly as they do between GPUs; bench/bench_sharding.py runs the same checks split over
cuda:0 and the CPU), the streaming export, and the memory plan against hand-computed figures."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import _random_text, char_tokenizer, tiny_model
from selfpruner import calibration, corpus, engine, evaluate, export, memory_plan, model_source, structure
from selfpruner.errors import DeviceFailed, UserError

SPLIT = ("llama-gqa", "llama-bias", "mistral-gqa", "qwen2-gqa")


def _folder(tmp_path, arch, layers=4):
    folder = tmp_path / arch
    tiny_model(arch, num_hidden_layers=layers).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", SPLIT)
def test_split_model_equals_single_device_logits(tmp_path, arch):
    folder = _folder(tmp_path, arch)
    single = engine.load(str(folder), devices=["cpu"]).model
    split = engine.load(str(folder), devices=["cpu", "cpu"]).model
    # the blocks are spread as the plan says, each with accelerate's device hook
    assert sorted(split.hf_device_map) == sorted(["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head",
                                                   *(f"model.layers.{i}" for i in range(4))])
    assert all(hasattr(layer, "_hf_hook") for layer in split.model.layers)
    assert not hasattr(single.model.layers[0], "_hf_hook")
    ids = torch.randint(2, 60, (2, 40))
    with torch.no_grad():
        a, b = single(ids).logits, split(ids).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2-gqa"])
def test_split_engine_calibrates_prunes_and_exports_like_one_device(tmp_path, text_ids, arch):
    folder = _folder(tmp_path, arch)
    text = tmp_path / "calibration.txt"
    text.write_text(_random_text(3, 4000))
    settings = engine.PruneSettings(metric="flap", calibration_text=str(text), calibration_windows=4,
                                    calibration_seq_len=64)
    one = engine.prepare(str(folder), settings, devices=["cpu"], progress=False)
    two = engine.prepare(str(folder), settings, devices=["cpu", "cpu"], progress=False)
    # collected afresh on each (sorted) model: `two` reused the calibration artifact `one` left in the cache
    ids = corpus.tokenize(one.loaded.tokenizer, text.read_text())
    stats = [calibration.collect(e.loaded.model, ids, num_windows=4, seq_len=64, progress=False) for e in (one, two)]
    for a, b in zip(stats[0].attention + stats[0].mlp, stats[1].attention + stats[1].mlp):
        torch.testing.assert_close(b.total, a.total, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(b.total_sq, a.total_sq, rtol=1e-9, atol=1e-9)
    g = one.pm.geometry
    rates = structure.Rates.parse([0.2, 0.6, 0.0, 0.4], g.num_layers)
    plan = structure.plan_from_rates(g, rates, head_mode=settings.head_mode, mlp_multiple=1)
    results = []
    for eng in (one, two):
        eng.pm.apply(plan)
        results.append(evaluate.perplexity(eng.loaded.model, text_ids, seq_len=64, max_tokens=512, batch_size=2))
    assert results[1].perplexity == pytest.approx(results[0].perplexity, rel=1e-5)
    outs = [export.export(e.pm, e.loaded.tokenizer, tmp_path / f"out{i}", info={}) for i, e in enumerate((one, two))]
    reloaded = [model_source.load(str(o)).model for o in outs]  # our bundled class, never the folder's code
    sd0, sd1 = reloaded[0].state_dict(), reloaded[1].state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        torch.testing.assert_close(sd1[k], sd0[k], atol=0, rtol=0)
    again = evaluate.perplexity(reloaded[1], text_ids, seq_len=64, max_tokens=512, batch_size=2)
    assert again.perplexity == pytest.approx(results[0].perplexity, rel=1e-5)
    for e in (one, two):
        e.pm.restore()


def test_streaming_export_writes_block_shards_with_an_index(tmp_path, text_ids, monkeypatch):
    """Shards of at most the largest group (embedding, one block, or the head), so the host holds
    one such group at a time; the index lists every tensor, and the checkpoint reloads."""
    monkeypatch.setattr(export, "MIN_SHARD", 0)
    folder = _folder(tmp_path, "llama-bias", layers=3)
    eng = engine.prepare(str(folder), engine.PruneSettings(metric="magnitude"), devices=["cpu", "cpu"],
                         progress=False)
    g = eng.pm.geometry
    plan = structure.plan_from_rates(g, structure.Rates.parse([0.3] * 3, 3), head_mode=eng.pm.head_mode,
                                      mlp_multiple=1)
    eng.pm.apply(plan)
    copies = []
    real = export._host_tensors

    def recording(sd, plain, names):
        copies.append(list(names))
        return real(sd, plain, names)

    monkeypatch.setattr(export, "_host_tensors", recording)
    out = export.export(eng.pm, eng.loaded.tokenizer, tmp_path / "out", info={})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(files) == len(copies) >= 4  # embedding, three blocks, head
    for names in copies:  # no shard mixes two blocks
        blocks = {n.split(".")[2] for n in names if n.startswith("model.layers.")}
        assert len(blocks) <= 1
    block_bytes = sum(t.numel() * t.element_size() for n, t in eng.loaded.model.state_dict().items()
                      if n.startswith("model.layers.0."))
    assert all(sum(eng.loaded.model.state_dict()[n].numel() * 4 for n in names) <= max(block_bytes, 4 * g.hidden_size * 96)
               for names in copies)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype="float32")
    assert set(index["weight_map"]) == set(reloaded.state_dict()) - {"lm_head.weight"} | (
        {"lm_head.weight"} if not reloaded.config.tie_word_embeddings else set())
    mine = evaluate.perplexity(eng.loaded.model, text_ids, seq_len=64, max_tokens=256)
    theirs = evaluate.perplexity(reloaded, text_ids, seq_len=64, max_tokens=256)
    assert theirs.perplexity == pytest.approx(mine.perplexity, rel=1e-5)


# -- the memory plan, on the published configs (no weights) ------------------------------------------
# (hidden, intermediate, layers, heads, kv heads, vocab)
CONFIGS = {
    "Llama-2-7B": (4096, 11008, 32, 32, 32, 32000),
    "Llama-2-13B": (5120, 13824, 40, 40, 40, 32000),
    "Llama-2-70B": (8192, 28672, 80, 64, 8, 32000),
    "Llama-3-8B": (4096, 14336, 32, 32, 8, 128256),
    "Llama-3-70B": (8192, 28672, 80, 64, 8, 128256),
}
# parameters as published (the sums of the safetensors of each model)
PUBLISHED = {"Llama-2-7B": 6_738_415_616, "Llama-2-13B": 13_015_864_320, "Llama-2-70B": 68_976_648_192,
             "Llama-3-8B": 8_030_261_248, "Llama-3-70B": 70_553_706_496}
H200 = 141 * 10**9


def _config(name):
    h, i, n, q, kv, v = CONFIGS[name]
    return LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=q,
                       num_key_value_heads=kv, vocab_size=v, tie_word_embeddings=False)


@pytest.mark.parametrize("name", CONFIGS)
def test_memory_plan_matches_hand_computed_figures(name):
    h, inter, n, q, kv, v = CONFIGS[name]
    d = h // q
    assert memory_plan.ModelSize.of(_config(name)).total_params == PUBLISHED[name]
    work = memory_plan.Workload(dtype="bfloat16", batch_size=1, seq_len=2048, calibration_seq_len=2048)
    p = memory_plan.plan(_config(name), work, gpus=8, gpu_memory=H200)
    # by hand, in bytes (bf16 = 2): one block is q/k/v/o + gate/up/down + two norms
    block = h * q * d * 2 + h * kv * d * 2 + 3 * h * inter + 2 * h
    embed, head = v * h, v * h + h
    assert embed + n * block + head == PUBLISHED[name]
    k = 2 if name.endswith("70B") else 1  # 70B in bf16 is 138 GB of weights, more than 92 % of one H200
    assert p.gpus_per_replica == k and p.replicas == 8 // k
    assert sum(s.weights for s in p.shares) == 2 * PUBLISHED[name]
    working = 2048 * 2 * (4 * h + max(2 * (q + kv) * d, 3 * inter))
    logits = 2048 * h * 2 + 1024 * v * (2 + 8)
    copies = 2 * h * q * d * (q // kv - 1) // (q // kv) * 2
    calibration = working + 2 * 2048 * inter * 8
    last = p.shares[-1]
    blocks = last.blocks[1] - last.blocks[0] + 1
    assert last.weights == 2 * (blocks * block + head + (embed if k == 1 else 0))
    assert last.copies == blocks * copies
    assert last.means == blocks * (q * d + inter) * 2
    assert last.evaluation == working + logits
    assert last.calibration == calibration + blocks * 16 * (q * d + inter)
    assert last.total == last.weights + last.copies + last.means + max(last.evaluation, last.calibration)
    # the blocks are split evenly: no GPU of a replica holds more than one block more than another
    counts = [s.blocks[1] - s.blocks[0] + 1 for s in p.shares]
    assert max(counts) - min(counts) <= 2
    assert p.to_dict()["per_gpu"][0]["total"] == p.shares[0].total


def test_memory_plan_figures_equal_the_modules_own_sizes():
    """The plan's bytes of a block and of the embedding are what accelerate counts on the
    model itself, built empty on the meta device from the Llama-2-70B config."""
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes

    config = _config("Llama-2-70B")
    config.num_hidden_layers = 2
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    sizes = compute_module_sizes(model)
    size = memory_plan.ModelSize.of(config)
    assert sizes["model.layers.0"] == 2 * size.block_params
    assert sizes["model.embed_tokens"] == 2 * size.embed_params
    assert sizes[""] - sizes["model.rotary_emb"] == 2 * size.total_params  # less the rotary frequencies


def test_70b_needs_two_h200s_and_is_refused_on_one():
    work = memory_plan.Workload(dtype="bfloat16", batch_size=1, seq_len=2048)
    with pytest.raises(UserError) as e:
        memory_plan.plan(_config("Llama-2-70B"), work, gpus=1, gpu_memory=H200)
    message = str(e.value)
    assert "\n" not in message
    assert "does not fit 1 GPU(s)" in message and "set spec.evaluator.gpusPerPod to at least 2" in message
    p = memory_plan.plan(_config("Llama-2-70B"), work, gpus=8, gpu_memory=H200)
    assert (p.gpus_per_replica, p.replicas) == (2, 4)
    assert p.device_map(["cuda:0", "cuda:1"])["model.layers.0"] == "cuda:0"
    assert p.device_map(["cuda:0", "cuda:1"])["model.layers.79"] == "cuda:1"
    assert p.device_map(["cuda:0", "cuda:1"])["lm_head"] == "cuda:1"


def test_memory_other_processes_hold_is_not_planned_for():
    """A GPU shared with other jobs (on the benchmark machine 24 searches shared one H100 and 12 ran
    out of memory mid-run): what other processes hold is not usable, the plan says so, and a model
    that no longer fits is refused before it loads, naming them."""
    work = memory_plan.Workload(dtype="bfloat16", batch_size=8, seq_len=512)
    h100 = 80 * 2**30
    idle = memory_plan.plan(_config("Llama-3-8B"), work, gpus=1, gpu_memory=h100)
    busy = memory_plan.plan(_config("Llama-3-8B"), work, gpus=1, gpu_memory=h100, held=40 * 2**30)
    assert busy.usable == idle.usable - 40 * 2**30
    assert "(40.0 GiB held by other processes)" in busy.lines()[1] and "held" not in idle.lines()[1]
    assert busy.to_dict()["held_by_others_bytes"] == 40 * 2**30
    with pytest.raises(UserError) as e:
        memory_plan.plan(_config("Llama-3-8B"), work, gpus=1, gpu_memory=h100, held=60 * 2**30)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("the GPU is busy: the model needs ") and "8.0B parameters in bfloat16" in message
    assert "other processes hold 60.0 GiB of its 80.0 GiB;" in message
    assert "CUDA_VISIBLE_DEVICES" in message and "run the same command again" in message
    assert "GPUs hold it" not in message and "more memory" not in message  # no advice to buy GPUs for a busy one
    assert isinstance(e.value, DeviceFailed)  # it fits once the others are done: exit 3, run it later
    with pytest.raises(UserError) as e:  # too large even for the idle GPU: bad input, not a busy device
        memory_plan.plan(_config("Llama-2-70B"), work, gpus=1, gpu_memory=h100, held=60 * 2**30)
    assert not isinstance(e.value, DeviceFailed) and "other processes hold 60.0 GiB" in str(e.value)


def test_a_local_llm_beside_the_model_is_planned_for():
    """Found on a shared H100: the 1.5B as a local LLM ran out of memory in `generate`, which the plan
    had not counted. Its weights, KV cache and prefill working set are now part of the plan of a model
    on its GPU; a model that fits alone but not beside it is refused naming the LLM's fields (bad
    input: no wait fixes it), and one that fits beside it once other processes free the GPU is busy."""
    from transformers import Qwen2Config

    qwen15 = Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
    assert memory_plan.ModelSize.of(qwen15).total_params == 1_543_714_304  # Qwen2.5-1.5B's published count
    weights = memory_plan.local_llm(qwen15, 0, 30)
    assert weights == 2 * 1_543_714_304  # bf16
    per_token = 28 * 2 * 2 * 128 * 2 + 3 * 8960 * 2  # K and V of 2 KV heads × 128 in 28 layers; gate, up, product
    assert memory_plan.local_llm(qwen15, 1, 16) - weights == 2048 * per_token  # at least 2048 tokens
    assert memory_plan.local_llm(qwen15, 32, 30) - weights == 32 * 30 * 128 * per_token

    work = memory_plan.Workload(dtype="bfloat16", batch_size=8, seq_len=512)
    h100 = 80 * 2**30
    alone = memory_plan.plan(_config("Llama-3-8B"), work, gpus=1, gpu_memory=h100)
    beside = memory_plan.plan(_config("Llama-3-8B"), work, gpus=1, gpu_memory=h100, llm=10 * 2**30)
    assert beside.usable == alone.usable - 10 * 2**30 and beside.to_dict()["local_llm_bytes"] == 10 * 2**30
    assert "(10.0 GiB for the local LLM)" in beside.lines()[1]
    with pytest.raises(UserError) as e:
        memory_plan.plan(_config("Llama-3-8B"), work, gpus=1, gpu_memory=h100, llm=60 * 2**30)
    assert not isinstance(e.value, DeviceFailed) and "\n" not in str(e.value)
    assert "not beside the local LLM (60.0 GiB" in str(e.value) and "spec.llm.batchSize" in str(e.value)
    with pytest.raises(DeviceFailed, match="the GPU is busy: the model and the local LLM need .* other processes "
                                           "hold 50.0 GiB"):
        memory_plan.plan(_config("Llama-3-8B"), work, gpus=1, gpu_memory=h100, held=50 * 2**30, llm=10 * 2**30)


def test_the_local_llm_is_counted_only_on_the_gpu_it_uses(tiny_job, tmp_path, monkeypatch):
    from conftest import tiny_chat_model
    from selfpruner import spec as spec_mod
    from selfpruner.executors.for_spec import local_llm_need
    from selfpruner.executors.local import llm_beside

    chat = tiny_chat_model()
    folder = tmp_path / "tiny-chat"
    chat.model.save_pretrained(folder)
    chat.tokenizer.save_pretrained(folder)
    llm = {"provider": "local", "model": str(folder)}
    job = spec_mod.parse(tiny_job("llm", search={"strategy": "llm-evolution"}, llm=llm))
    need = memory_plan.local_llm(model_source.load_config(str(folder)), 32, 6)  # the tiny job prunes 6 blocks
    monkeypatch.setenv("SELFPRUNER_LLM_DEVICE", "cuda")
    assert local_llm_need(job) == ("cuda:0", need)
    monkeypatch.setenv("SELFPRUNER_LLM_DEVICE", "cpu")
    assert local_llm_need(job) is None
    monkeypatch.setenv("SELFPRUNER_LLM_DEVICE", "cuda:1")
    assert local_llm_need(spec_mod.parse(tiny_job("genetic", llm=llm))) is None
    assert local_llm_need(spec_mod.parse(tiny_job("endpoint", search={"strategy": "llm-evolution"},
                                                  llm={"provider": "openai", "model": "m"}))) is None
    assert llm_beside(("cuda:1", need), ["cuda:0", "cuda:1"]) == need
    assert llm_beside(("cuda:0", need), ["cuda"]) == need
    assert llm_beside(("cuda:1", need), ["cuda:0"]) == 0 and llm_beside(None, ["cuda:0"]) == 0


def test_a_working_set_too_large_names_batch_size_and_seq_len():
    work = memory_plan.Workload(dtype="bfloat16", batch_size=64, seq_len=32768)
    with pytest.raises(UserError) as e:
        memory_plan.plan(_config("Llama-3-8B"), work, gpus=1, gpu_memory=80 * 2**30)
    message = str(e.value)
    assert "\n" not in message
    assert "lower spec.fitness.batchSize or spec.fitness.seqLen" in message


def test_a_fixed_replica_width_that_cannot_fit_names_gpus_per_replica():
    work = memory_plan.Workload(dtype="bfloat16")
    with pytest.raises(UserError, match="set spec.evaluator.gpusPerReplica to at least 2"):
        memory_plan.plan(_config("Llama-2-70B"), work, gpus=4, gpu_memory=H200, gpus_per_replica=1)
    with pytest.raises(UserError, match="more than the 2 GPU"):
        memory_plan.plan(_config("Llama-2-70B"), work, gpus=2, gpu_memory=H200, gpus_per_replica=4)


def test_tied_head_stays_with_the_embedding():
    config = _config("Llama-3-8B")
    config.tie_word_embeddings = True
    p = memory_plan.plan(config, memory_plan.Workload(), gpus=2, gpu_memory=None, gpus_per_replica=2)
    m = p.device_map(["cuda:0", "cuda:1"])
    assert m["lm_head"] == m["model.embed_tokens"] == "cuda:0"
    assert p.shares[0].evaluation > p.shares[1].evaluation  # the logits are computed on GPU 0


@pytest.mark.parametrize("text,expected", [("80Gi", 80 * 2**30), ("141G", 141 * 10**9), ("1.5Ti", int(1.5 * 2**40)),
                                           ("1000", 1000)])
def test_gpu_memory_quantities(text, expected):
    assert memory_plan.parse_bytes(text) == expected


def test_a_bad_gpu_memory_quantity_says_how_to_write_it():
    with pytest.raises(UserError, match="write it like 80Gi"):
        memory_plan.parse_bytes("lots")


# -- replicas -------------------------------------------------------------------------------------------
def _texts(seed=5):
    return {"fitness": _random_text(seed, 3000), "heldout": _random_text(seed + 1, 3000)}


def test_replicas_split_the_devices_and_evaluate_like_one_copy(tmp_path):
    """Four devices, replicas of two: two copies of the model, each split over its two devices,
    evaluating the candidates in parallel with the results of a single copy."""
    from selfpruner.executors.base import EvalTask
    from selfpruner.executors.local import LocalExecutor

    folder = _folder(tmp_path, "llama-gqa", layers=4)
    settings = engine.PruneSettings(metric="magnitude")
    one = LocalExecutor(str(folder), settings, _texts(), seq_len=64, devices=["cpu"], progress=False)
    four = LocalExecutor(str(folder), settings, _texts(), seq_len=64, devices=["cpu"] * 4, progress=False,
                         gpus_per_replica=2)
    assert [w.devices for w in four.workers] == [["cpu", "cpu"], ["cpu", "cpu"]]
    assert all(hasattr(w.eng.loaded.model.model.layers[0], "_hf_hook") for w in four.workers)
    assert (four.memory_plan["gpus_per_replica"], four.memory_plan["replicas"]) == (2, 2)
    tasks = [EvalTask(rates=[r, 0.5 - r, r, 0.1], tokens=256) for r in (0.0, 0.1, 0.2, 0.3, 0.4)]
    seen = []
    a = one.evaluate(tasks)
    b = four.evaluate(tasks, on_result=lambda i, o: seen.append(i))
    assert sorted(seen) == list(range(len(tasks)))
    assert [o.error for o in b] == [None] * len(tasks)
    assert [o.fitness for o in b] == pytest.approx([o.fitness for o in a], rel=1e-5)
    # automatic: nothing bounds a CPU's memory, so every device is a replica of one
    auto = LocalExecutor(str(folder), settings, _texts(), seq_len=64, devices=["cpu"] * 3, progress=False)
    assert [w.devices for w in auto.workers] == [["cpu"], ["cpu"], ["cpu"]]


def test_the_memory_plan_is_printed_and_in_result_json(tiny_job, capsys):
    from selfpruner import spec as spec_mod
    from selfpruner.search import runner

    job = spec_mod.parse(tiny_job("planned", search={"population": 2, "generations": 1, "crossovers": 1,
                                                     "mutations": 1, "baselines": []}))
    result = runner.run(job, progress=False)
    assert "memory plan:" in capsys.readouterr().err
    plan = result["memory_plan"]
    assert plan["gpus_per_replica"] == 1 and plan["devices"]
    assert plan["per_gpu"][0]["weights"] == 4 * plan["params"]  # float32, one device


def test_the_controller_refuses_a_model_that_cannot_fit_before_any_gpu_pod(tiny_job):
    """evaluator.gpuMemory known and the config readable: the PruneJob fails with the plan's
    line (ModelDoesNotFit, never retried) before a pod is made."""
    from selfpruner import spec as spec_mod
    from selfpruner.cluster import controller, failures

    from selfpruner.executors.for_spec import workload

    doc = tiny_job("nofit", evaluator={"gpusPerPod": 1})
    doc["spec"]["storage"] = {"uri": "file:///unused"}
    job = spec_mod.parse(doc)
    config = memory_plan.config_from_json(json.loads((Path(doc["spec"]["model"]["source"]) / "config.json").read_text()))
    halves = memory_plan.plan(config, workload(job), gpus=2, gpus_per_replica=2)
    whole = memory_plan.plan(config, workload(job), gpus=1)
    memory = int(max(s.total for s in halves.shares) / memory_plan.USABLE) + 1  # two such GPUs hold it, one does not
    assert whole.shares[0].total > memory * memory_plan.USABLE
    doc["spec"]["evaluator"]["gpuMemory"] = str(memory)
    with pytest.raises(failures.Verdict) as e:
        controller.check_fit(spec_mod.parse(doc))
    reason, message = failures.classify(e.value)
    assert reason == "ModelDoesNotFit" and "\n" not in message
    assert "does not fit 1 GPU(s)" in message and "set spec.evaluator.gpusPerPod to at least 2" in message
    doc["spec"]["evaluator"].update(gpusPerPod=2)
    assert controller.check_fit(spec_mod.parse(doc))["gpus_per_replica"] == 2


def test_the_refit_state_is_planned_and_its_refusal_names_the_switch():
    """pruning.refit keeps float32 covariances and Cholesky factors per block (and calibration
    their Gram matrices): the plan adds them by hand's arithmetic, and when they are what does
    not fit, the one-line refusal says the refit can be turned off."""
    name = "Llama-2-13B"
    h, inter, n, q, kv, v = CONFIGS[name]
    d = h // q
    plain = memory_plan.Workload(dtype="bfloat16", batch_size=1, seq_len=2048)
    refit = memory_plan.Workload(dtype="bfloat16", batch_size=1, seq_len=2048, refit=True)
    a = memory_plan.plan(_config(name), plain, gpus=8, gpu_memory=H200)
    b = memory_plan.plan(_config(name), refit, gpus=8, gpu_memory=H200, gpus_per_replica=a.gpus_per_replica + 1)
    gram = 4 * ((q * d) ** 2 + inter ** 2)
    for s in b.shares:
        blocks = s.blocks[1] - s.blocks[0] + 1
        # MHA (no per-group covariance): L⁻¹ and W Σ L⁻ᵀ per projection, and 4 widths in bf16
        assert s.refit == blocks * (gram + 4 * h * (q * d + inter) + 4 * h * (q * d + inter) * 2)
        assert s.total == s.weights + s.copies + s.means + s.refit + max(s.evaluation, s.calibration)
    assert all(s.refit == 0 for s in a.shares)
    assert a.gpus_per_replica == 1  # 13B in bf16 fits one H200; with its refit state and Gram matrices it does not
    with pytest.raises(UserError, match=r"turn off spec\.pruning\.refit") as e:
        memory_plan.plan(_config(name), refit, gpus=8, gpu_memory=H200, gpus_per_replica=1)
    assert "spec.evaluator.gpusPerReplica to at least 2" in str(e.value) and "\n" not in str(e.value)


def test_the_planned_refit_state_is_what_the_model_holds(text_ids):
    from selfpruner import calibration, importance
    from selfpruner.pruned_model import PrunableModel

    model = tiny_model("llama-gqa")
    stats = calibration.collect(model, text_ids, num_windows=2, seq_len=64, progress=False, gram=True)
    pm = PrunableModel(model, importance.score_model(model, stats, "wanda-sp"), stats, refit=True)
    held = sum(t.numel() * t.element_size() for st in pm._attn_refit + pm._mlp_refit
               for t in (st.p, st.linv, st.cov) if t is not None)
    assert pm._attn_refit[0].cov is not None and pm._mlp_refit[0].cov is None  # per-group GQA: heads need it
    p = memory_plan.plan(model.config, memory_plan.Workload(dtype="float32", refit=True), gpus=1)
    g = pm.geometry
    cache = 4 * g.hidden_size * (g.num_heads * g.head_dim + g.intermediate_size) * 4 * g.num_layers
    assert p.shares[0].refit == held + cache


@pytest.mark.parametrize("metric", ["perplexity", "kl"])
def test_a_candidate_whose_fitness_is_not_finite_is_a_failed_evaluation(tmp_path, metric):
    """A forward pass that gives NaN logits (here: the final norm's weights are NaN) must not hand
    NaN to the search, where it compares false with everything and no JSON reader accepts it."""
    from selfpruner.executors.base import EvalTask
    from selfpruner.executors.local import LocalExecutor

    model = tiny_model("llama-gqa", num_hidden_layers=2)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan")
    char_tokenizer().save_pretrained(tmp_path / "nan")
    ex = LocalExecutor(str(tmp_path / "nan"), engine.PruneSettings(metric="magnitude"), _texts(), seq_len=64,
                       devices=["cpu"], progress=False, metric=metric)
    [outcome] = ex.evaluate([EvalTask(rates=[0.2, 0.2], tokens=256)])
    assert outcome.fitness is None and outcome.error.startswith("NonFiniteFitness: ")
    assert "nan" in outcome.error
