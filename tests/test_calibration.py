"""Calibration statistics: right numbers, bounded memory, saved and reused by key."""

import torch

from conftest import tiny_model
from selfpruner import calibration


def test_statistics_match_the_activations(text_ids):
    model = tiny_model("qwen2-gqa")
    seen = {}

    def grab(name):
        return lambda mod, args: seen.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))

    layer = model.model.layers[1]
    h1 = layer.self_attn.o_proj.register_forward_pre_hook(grab("o"))
    h2 = layer.mlp.down_proj.register_forward_pre_hook(grab("down"))
    stats = calibration.collect(model, text_ids, num_windows=3, seq_len=100, batch_size=2, progress=False)
    h1.remove(), h2.remove()
    for part, name in ((stats.attention[1], "o"), (stats.mlp[1], "down")):
        x = torch.cat(seen[name]).double()
        assert part.count == 300 and part.total.dtype == torch.float64
        torch.testing.assert_close(part.total, x.sum(0))
        torch.testing.assert_close(part.total_sq, (x * x).sum(0))


def test_artifact_is_reused_for_the_same_key(text_ids, monkeypatch):
    model = tiny_model("llama-gqa")
    first = calibration.calibrate(model, text_ids, num_windows=2, seq_len=64, progress=False)

    def must_not_run(*a, **k):
        raise AssertionError("statistics were recomputed although the key matched")

    monkeypatch.setattr(calibration, "collect", must_not_run)
    again = calibration.calibrate(model, text_ids, num_windows=2, seq_len=64, progress=False)
    assert again.key == first.key
    torch.testing.assert_close(again.mlp[0].total, first.mlp[0].total)
    # a different window count, text or model is a different key
    assert calibration.calibration_key(model, text_ids, 3, 64) != first.key
    assert calibration.calibration_key(model, text_ids[1:], 2, 64) != first.key
    assert calibration.calibration_key(tiny_model("llama-gqa", seed=5), text_ids, 2, 64) != first.key


def test_gram_matrices_match_the_activations_and_travel_with_the_artifact(text_ids, monkeypatch):
    model = tiny_model("llama-gqa")
    seen = []
    h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    plain = calibration.calibrate(model, text_ids, num_windows=2, seq_len=64, progress=False)
    assert not plain.has_gram
    seen.clear()
    # asked for Gram matrices, a cached artifact without them is collected again
    with_gram = calibration.calibrate(model, text_ids, num_windows=2, seq_len=64, progress=False, gram=True)
    h.remove()
    assert seen, "the artifact without Gram matrices was reused"
    x = torch.cat(seen).double()
    torch.testing.assert_close(with_gram.mlp[0].gram.double(), x.T @ x, rtol=1e-5, atol=1e-4)
    cov = torch.cov(x.T, correction=0).float()
    torch.testing.assert_close(with_gram.mlp[0].covariance, cov, rtol=1e-4, atol=1e-5)

    def must_not_run(*a, **k):
        raise AssertionError("statistics were recomputed although the saved ones had the Gram matrices")

    monkeypatch.setattr(calibration, "collect", must_not_run)
    for gram in (True, False):  # the artifact with Gram matrices now serves both
        again = calibration.calibrate(model, text_ids, num_windows=2, seq_len=64, progress=False, gram=gram)
        assert again.has_gram
        torch.testing.assert_close(again.attention[1].gram, with_gram.attention[1].gram)
