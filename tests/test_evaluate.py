"""Perplexity: equals Hugging Face's own loss, deterministic, any window length, any dtype."""

import math

import pytest
import torch

from conftest import tiny_model
from selfpruner.errors import UserError
from selfpruner.evaluate import eval_windows, perplexity


def test_matches_the_models_own_loss(text_ids):
    model = tiny_model("llama-gqa")
    result = perplexity(model, text_ids, seq_len=256, max_tokens=1024, batch_size=3, logits_chunk=100)
    windows = text_ids[:1024].view(4, 256)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    assert result.tokens == 4 * 255
    assert result.perplexity == pytest.approx(math.exp(sum(losses) / 4), rel=1e-5)


def test_deterministic_and_batch_size_independent(text_ids):
    model = tiny_model("qwen2-gqa")
    a = perplexity(model, text_ids, seq_len=128, max_tokens=2048, batch_size=1)
    b = perplexity(model, text_ids, seq_len=128, max_tokens=2048, batch_size=1)
    c = perplexity(model, text_ids, seq_len=128, max_tokens=2048, batch_size=4)
    assert a.perplexity == b.perplexity
    assert c.perplexity == pytest.approx(a.perplexity, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_close_to_float32(text_ids, dtype):
    model = tiny_model("mistral-gqa")
    ref = perplexity(model, text_ids, seq_len=128, max_tokens=1024)
    half = perplexity(model.to(dtype), text_ids, seq_len=128, max_tokens=1024)
    assert half.perplexity == pytest.approx(ref.perplexity, rel=2e-2)


def test_windows():
    ids = torch.arange(1000)
    assert eval_windows(ids, seq_len=300).shape == (3, 300)
    assert eval_windows(ids, seq_len=300, max_tokens=650).shape == (2, 300)
    assert eval_windows(ids, seq_len=2048, max_tokens=500).shape == (1, 500)  # budget below one window
    with pytest.raises(UserError):
        eval_windows(ids[:1], seq_len=2048)
