"""Slice == mask == exported checkpoint; rate 0 == the original model (tiny real models)."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ARCHS, char_tokenizer, tiny_model
from selfpruner import calibration, export, importance, model_source, structure
from selfpruner.errors import UserError
from selfpruner.architecture import geometry_of
from selfpruner.pruned_model import PrunableModel

HEAD_MODES = ("per-group", "kv-group")
RATE_CASES = {
    "uniform": structure.Rates(block=(0.3, 0.3)),
    "non-uniform": structure.Rates(block=(0.15, 0.55)),
    "separate": structure.Rates(attention=(0.5, 0.0), mlp=(0.2, 0.6)),
    "attention-gone": structure.Rates(attention=(0.99, 0.3), mlp=(0.1, 0.9)),
}


def prepared(arch, text_ids, head_mode="per-group", metric="wanda-sp", compensate=True):
    model = tiny_model(arch)
    original = copy.deepcopy(model)
    stats = calibration.collect(model, text_ids, num_windows=8, seq_len=128, progress=False)
    scores = importance.score_model(model, stats, metric)
    pm = PrunableModel(model, scores, stats, head_mode=head_mode, bias_compensation=compensate)
    return pm, original


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.fixture
def batch():
    torch.manual_seed(3)
    return torch.randint(2, 90, (2, 33))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("head_mode", HEAD_MODES)
def test_rate_zero_is_the_original_model(arch, head_mode, text_ids, batch):
    pm, original = prepared(arch, text_ids, head_mode)
    ref = logits(original, batch)
    sorted_dense = logits(pm.model, batch)
    # sorting heads/channels is a permutation: same function, up to summation order
    torch.testing.assert_close(sorted_dense, ref, rtol=1e-5, atol=1e-5)
    plan = structure.plan_from_rates(geometry_of(pm.model.config), structure.Rates.uniform(0.0, 2),
                                     head_mode=head_mode)
    assert plan.is_dense and plan.achieved_ratio == 0.0
    pm.apply(plan)
    assert torch.equal(logits(pm.model, batch), sorted_dense)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("head_mode", HEAD_MODES)
@pytest.mark.parametrize("case", RATE_CASES)
def test_slice_equals_mask_equals_export(arch, head_mode, case, text_ids, batch, tmp_path):
    pm, _ = prepared(arch, text_ids, head_mode)
    dense = logits(pm.model, batch)
    plan = structure.plan_from_rates(geometry_of(pm.model.config), RATE_CASES[case], head_mode=head_mode)
    assert not plan.is_dense

    pm.apply(plan, mode="mask")
    masked = logits(pm.model, batch)
    pm.apply(plan, mode="slice")
    sliced = logits(pm.model, batch)
    torch.testing.assert_close(sliced, masked, rtol=0, atol=1e-5)
    assert (sliced - dense).abs().max() > 1e-3  # pruning did change the model

    out = export.export(pm, None, tmp_path / "ckpt", info={"case": case})
    meta = json.loads((out / "pruning.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=meta["loads_with"] != "plain").eval()
    assert (sliced - logits(reloaded, batch)).abs().max() <= 1e-4
    assert meta["achieved_ratio"] == pytest.approx(plan.achieved_ratio)
    kept_block_params = sum(
        p.numel() for n, p in reloaded.named_parameters() if ".layers." in n and n.endswith(".weight") and "proj" in n
    )
    assert kept_block_params == plan.kept_params  # physically smaller, by exactly the plan

    pm.restore()
    assert torch.equal(logits(pm.model, batch), dense)  # back to dense, exactly


def test_uniform_plans_export_as_the_plain_architecture(text_ids, tmp_path):
    pm, _ = prepared("llama-gqa", text_ids, compensate=False)
    plan = structure.plan_from_rates(geometry_of(pm.model.config), structure.Rates.uniform(0.5, 2))
    pm.apply(plan)
    out = export.export(pm, None, tmp_path / "plain", info={})
    meta = json.loads((out / "pruning.json").read_text())
    assert meta["loads_with"] == "plain"
    assert not (out / "modeling_selfpruner.py").exists()
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["intermediate_size"] == plan.layers[0].channels
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded).__name__ == "LlamaForCausalLM"


def test_generation_works_when_a_block_lost_all_heads(text_ids, tmp_path):
    pm, _ = prepared("llama-gqa", text_ids)
    rates = structure.Rates(attention=(0.99, 0.0), mlp=(0.3, 0.3))
    plan = structure.plan_from_rates(geometry_of(pm.model.config), rates)
    assert plan.layers[0].num_heads == 0
    pm.apply(plan)
    out = export.export(pm, None, tmp_path / "gen", info={})
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    prompt = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_bias_compensation_is_exact_for_a_constant_channel(text_ids, batch):
    """MLP channel 0 gets a constant input (zero gate/up weights, fixed biases): pruning it
    with compensation must leave the model unchanged; without, it must not."""
    model = tiny_model("llama-bias")
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            mlp.gate_proj.weight[0].zero_()
            mlp.up_proj.weight[0].zero_()
            mlp.gate_proj.bias[0] = 1.5
            mlp.up_proj.bias[0] = -2.0
    stats = calibration.collect(model, text_ids, num_windows=4, seq_len=128, progress=False)
    scores = importance.score_model(model, stats, "magnitude")
    for s in scores:  # make channel 0 the least important, so it is the one pruned
        s.channels[0] = -1.0
    dense = logits(model, batch)
    g = geometry_of(model.config)
    # remove exactly one MLP channel per block, no heads
    rates = structure.Rates(attention=(0.0, 0.0), mlp=(1 / g.intermediate_size,) * 2)
    for compensate, should_match in ((True, True), (False, False)):
        pm = PrunableModel(model, scores, stats, bias_compensation=compensate)
        plan = structure.plan_from_rates(g, rates, mlp_multiple=1)
        assert [s.channels for s in plan.layers] == [g.intermediate_size - 1] * 2
        pm.apply(plan)
        diff = (logits(model, batch) - dense).abs().max().item()
        pm.restore()
        assert (diff < 1e-5) == should_match, diff


def test_a_checkpoint_from_storage_loads_our_bundled_code_never_its_own(text_ids, batch, tmp_path):
    """A folder from a store can carry any modeling_selfpruner.py; loading it (in a pod holding
    the store's credentials) must not run that file: the class comes from the installed package."""
    pm, _ = prepared("llama-gqa", text_ids)
    plan = structure.plan_from_rates(geometry_of(pm.model.config), RATE_CASES["non-uniform"])
    pm.apply(plan, mode="slice")
    expected = logits(pm.model, batch)
    out = export.export(pm, char_tokenizer(), tmp_path / "ckpt", info={})
    assert json.loads((out / "pruning.json").read_text())["loads_with"] == "trust_remote_code"
    marker = tmp_path / "the-folder-code-ran"
    planted = f"open({str(marker)!r}, 'w').write('pwned')\n"
    code = (out / "modeling_selfpruner.py").read_text()
    head = "from __future__ import annotations\n"
    (out / "modeling_selfpruner.py").write_text(code.replace(head, head + planted, 1))

    loaded = model_source.load(str(out))
    assert not marker.exists(), "code from the model folder ran"
    assert type(loaded.model).__module__ == "selfpruner.hf_code.modeling_selfpruner"
    assert (logits(loaded.model, batch) - expected).abs().max() <= 1e-4

    config = json.loads((out / "config.json").read_text())
    config["architectures"] = ["SomethingElseForCausalLM"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="names architectures.*SelfPrunerLlamaForCausalLM"):
        model_source.load(str(out))
    assert not marker.exists()


def refitted(arch, text_ids, head_mode="per-group"):
    model = tiny_model(arch)
    stats = calibration.collect(model, text_ids, num_windows=8, seq_len=128, progress=False, gram=True)
    scores = importance.score_model(model, stats, "wanda-sp")
    return PrunableModel(model, scores, stats, head_mode=head_mode, bias_compensation=True, refit=True), stats


def test_refit_needs_the_gram_matrices(text_ids):
    model = tiny_model("llama-gqa")
    stats = calibration.collect(model, text_ids, num_windows=2, seq_len=64, progress=False)
    with pytest.raises(ValueError, match="gram=True"):
        PrunableModel(model, importance.score_model(model, stats, "wanda-sp"), stats, refit=True)


@pytest.mark.parametrize("arch", ["llama-bias", "qwen2-gqa"])
@pytest.mark.parametrize("head_mode", HEAD_MODES)
def test_refit_is_the_least_squares_solution_on_the_calibration_activations(arch, head_mode, text_ids, monkeypatch):
    """down_proj's and o_proj's output error after the refit against torch.linalg.lstsq's
    optimum on the very activations the statistics were collected from (damping made
    negligible), and below bias compensation's."""
    from selfpruner import pruned_model

    monkeypatch.setattr(pruned_model, "REFIT_DAMPING", 1e-7)
    pm, stats = refitted(arch, text_ids, head_mode)
    layer = pm.layers[0]  # attention rate 0.5 and MLP rate 0.2 in this case: both refitted
    seen = {}
    hooks = [mod.register_forward_pre_hook(lambda m, a, n=name: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for name, mod in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj))]
    with torch.no_grad():  # the sorted dense model sees the calibration windows again
        pm.model(calibration.windows(text_ids, 8, 128))
    for h in hooks:
        h.remove()
    dense = {"o": (layer.self_attn.o_proj.weight.clone(), layer.self_attn.o_proj.bias),
             "down": (layer.mlp.down_proj.weight.clone(), layer.mlp.down_proj.bias)}
    plan = structure.plan_from_rates(geometry_of(pm.model.config), RATE_CASES["separate"], head_mode=head_mode)
    pm.apply(plan)
    shape = plan.layers[0]
    kept = {"o": pm._kept_q_channels(shape.heads_per_group, shape.kv_groups), "down": torch.arange(shape.channels)}
    new = {"o": layer.self_attn.o_proj, "down": layer.mlp.down_proj}
    for name in ("o", "down"):
        x = torch.cat(seen[name]).double()
        w, b = dense[name][0].double(), None if dense[name][1] is None else dense[name][1].detach()
        target = x @ w.T + (0 if b is None else b.double())
        xk = torch.cat([x[:, kept[name]], torch.ones(len(x), 1, dtype=x.dtype)], 1)
        solution = torch.linalg.lstsq(xk, target).solution  # [kept + 1, out]
        best_err = (xk @ solution - target).square().mean()
        refit_err = (x[:, kept[name]] @ new[name].weight.double().T + new[name].bias.double() - target).square().mean()
        # the error, not the weights: heads of one KV group are nearly collinear in a tiny random
        # model, so equally good solutions can differ in the weights
        assert refit_err <= best_err * (1 + 1e-3) + 1e-10, (name, refit_err, best_err)
        mean = x.mean(0)
        removed = torch.ones(x.shape[1], dtype=torch.bool)
        removed[kept[name]] = False
        comp_b = (0 if b is None else b.double()) + w[:, removed] @ mean[removed]
        comp_err = (x[:, kept[name]] @ w[:, kept[name]].T + comp_b - target).square().mean()
        assert refit_err <= comp_err * (1 + 1e-6), (name, refit_err, comp_err)
        assert refit_err < comp_err * 0.99, (name, refit_err, comp_err)  # and strictly better here


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("head_mode", HEAD_MODES)
def test_refit_slice_equals_mask_equals_export_and_rate_zero_is_exact(arch, head_mode, text_ids, batch, tmp_path):
    pm, _ = refitted(arch, text_ids, head_mode)
    sorted_dense = logits(pm.model, batch)
    g = geometry_of(pm.model.config)
    pm.apply(structure.plan_from_rates(g, structure.Rates.uniform(0.0, 2), head_mode=head_mode))
    assert torch.equal(logits(pm.model, batch), sorted_dense)
    for case in ("separate", "attention-gone"):
        plan = structure.plan_from_rates(g, RATE_CASES[case], head_mode=head_mode)
        pm.apply(plan, mode="mask")
        masked = logits(pm.model, batch)
        pm.apply(plan, mode="slice")
        sliced = logits(pm.model, batch)
        torch.testing.assert_close(sliced, masked, rtol=0, atol=1e-5)
        pm.apply(structure.plan_from_rates(g, RATE_CASES["uniform"], head_mode=head_mode))
        pm.apply(plan)  # from the cache of refitted widths: the same model again
        assert torch.equal(logits(pm.model, batch), sliced)
        out = export.export(pm, None, tmp_path / case, info={"case": case})
        meta = json.loads((out / "pruning.json").read_text())
        assert meta["refit"] is True
        reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=meta["loads_with"] != "plain").eval()
        assert (sliced - logits(reloaded, batch)).abs().max() <= 1e-4
