"""KL fitness: the dense model scores 0 against its own top-k reference, a pruned one more; with
k = vocabulary it is the exact KL; the reference is cached per (model, text, window length, k) and
per window; an executor with `fitness.metric: kl` scores candidates by it and held-out text by
perplexity (tiny real models)."""

import pytest
import torch

from conftest import tiny_model
from selfpruner import dense_reference, evaluate, importance, paths, structure
from selfpruner.architecture import geometry_of
from selfpruner.pruned_model import PrunableModel

SEQ_LEN, TOKENS = 64, 256  # four windows


@pytest.fixture(autouse=True)
def _fresh_memory():
    dense_reference.forget()  # the process-wide copies would outlive each test's own cache folder
    yield
    dense_reference.forget()


def _reference(model, ids, k, sample=None, batch_size=2):
    picked, wins = evaluate.select_windows(ids, SEQ_LEN, TOKENS, sample)
    return wins, dense_reference.dense_topk(model, ids, picked, window_len=wins.shape[1], k=k, batch_size=batch_size)


class _Forwards:
    """Counts the decoder's forward passes with a real forward hook."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.get_decoder().register_forward_hook(self._count)

    def _count(self, module, args, output):
        self.calls += 1

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


def _exact_kl(dense, other, wins) -> float:
    """Mean KL(dense || other) over the whole vocabulary, straight from the models' logits."""
    with torch.no_grad():
        lp = dense(wins).logits[:, :-1].double().log_softmax(-1)
        lq = other(wins).logits[:, :-1].double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def test_the_dense_model_is_at_zero_and_a_pruned_one_above(text_ids):
    model = tiny_model("llama-gqa")
    wins, ref = _reference(model, text_ids, k=8)
    assert ref.logp.shape == (4, SEQ_LEN - 1, 8) and ref.index.dtype == torch.int32
    assert torch.all(ref.logp[..., :-1] >= ref.logp[..., 1:])  # descending
    # the k buckets and the tail hold the whole distribution
    total = ref.logp.double().exp().sum(-1) + ref.tail.double().exp()
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
    dense = evaluate.kl_of_windows(model, wins, ref, batch_size=3, logits_chunk=20)
    assert dense.tokens == 4 * (SEQ_LEN - 1)
    assert abs(dense.kl) < 1e-6

    pm = PrunableModel(model, importance.score_model(model, None, "magnitude"))
    pm.apply(structure.plan_from_rates(geometry_of(model.config), structure.Rates.uniform(0.4, 2), mlp_multiple=1))
    pruned = evaluate.kl_of_windows(model, wins, ref, batch_size=2)
    pm.restore()
    assert pruned.kl > 1e-5  # a random tiny model's distributions are close to uniform: small, but far above 0
    assert abs(evaluate.kl_of_windows(model, wins, ref).kl) < 1e-6  # restored: dense again


def test_with_k_the_vocabulary_it_is_the_exact_kl(text_ids):
    dense, other = tiny_model("qwen2-gqa", seed=0), tiny_model("qwen2-gqa", seed=3)
    vocab = dense.config.vocab_size
    wins, full = _reference(dense, text_ids, k=vocab + 10)  # clamped to the vocabulary: no tail
    assert full.k == vocab and torch.all(torch.isneginf(full.tail))
    exact = _exact_kl(dense, other, wins)
    assert exact > 1e-3
    assert evaluate.kl_of_windows(other, wins, full, batch_size=2, logits_chunk=30).kl == pytest.approx(exact, abs=1e-6)
    # fewer buckets can only lose information: the top-k KL is below the exact one, and still positive
    _, top = _reference(dense, text_ids, k=4)
    assert 0 < evaluate.kl_of_windows(other, wins, top).kl <= exact + 1e-9


def test_the_reference_is_cached_per_model_text_windows_and_k(text_ids):
    model = tiny_model("llama-mha")
    forwards = _Forwards(model)
    _, first = _reference(model, text_ids, k=8, batch_size=2)
    assert forwards.take() == 2  # four windows, batches of two
    root = paths.cache_dir("dense_topk")
    assert [len(list(d.glob("*.safetensors"))) for d in root.iterdir()] == [4]  # a file per window

    _, again = _reference(model, text_ids, k=8)
    assert forwards.take() == 0  # from memory
    dense_reference.forget()
    _, from_disk = _reference(model, text_ids, k=8)
    assert forwards.take() == 0  # from disk
    for a, b in ((first.logp, again.logp), (first.index, from_disk.index), (first.tail, from_disk.tail)):
        assert torch.equal(a, b)

    _reference(model, text_ids, k=5)  # another k: another entry
    assert forwards.take() == 2
    _reference(model, text_ids.flip(0), k=8)  # another text: another entry
    assert forwards.take() == 2
    assert len(list(root.iterdir())) == 3

    # windows drawn afresh: only those not seen before are computed, each once
    picked, wins = evaluate.select_windows(text_ids, SEQ_LEN, TOKENS, sample=7)
    seen = [i for i in picked if i < 4]
    drawn = dense_reference.dense_topk(model, text_ids, picked, window_len=SEQ_LEN, k=8, batch_size=1)
    assert forwards.take() == len(picked) - len(seen)
    assert abs(evaluate.kl_of_windows(model, wins, drawn, batch_size=4).kl) < 1e-6
    assert forwards.take() == 1  # the KL's own forward pass
    for i in seen:
        assert torch.equal(drawn.logp[picked.index(i)], first.logp[i])
    dense_reference.dense_topk(model, text_ids, picked, window_len=SEQ_LEN, k=8)
    assert forwards.take() == 0


def test_an_executor_with_metric_kl_scores_fitness_by_kl_and_held_out_text_by_perplexity(tiny_job):
    from selfpruner import spec as spec_mod
    from selfpruner.executors.base import EvalTask
    from selfpruner.executors.for_spec import make_executor

    job = spec_mod.parse(tiny_job("kl", fitness={"metric": "kl", "topK": 16, "tokens": 256}))
    executor = make_executor(job, progress=False)
    assert (executor.metric, executor.top_k) == ("kl", 16)
    layers = executor.geometry.num_layers
    dense, pruned, drawn, held = executor.evaluate([
        EvalTask(rates=[0.0] * layers, tokens=256),
        EvalTask(rates=[0.3] * layers, tokens=256),
        EvalTask(rates=[0.0] * layers, tokens=256, sample=5),
        EvalTask(rates=[0.3] * layers, tokens=1024, text="heldout"),
    ])
    assert [o.error for o in (dense, pruned, drawn, held)] == [None] * 4
    assert abs(dense.fitness) < 1e-6 and abs(drawn.fitness) < 1e-6
    assert pruned.fitness > 1e-5 and pruned.achieved_ratio > 0
    assert dense.tokens == 2 * 127
    assert held.fitness > 1 and held.tokens == 8 * 127  # a perplexity
