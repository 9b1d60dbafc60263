"""Staged selection on fresh windows, and budgets in tokens, end to end on a tiny real model."""

import json
from collections import Counter

import pytest
import torch

from selfpruner import evaluate
from selfpruner import spec as spec_mod
from selfpruner.errors import UserError
from selfpruner.search import runner
from selfpruner.search.strategy import Stage, sample_seed

STAGES = [{"tokens": 128, "survivors": 3}, {"tokens": 256, "survivors": 1}]


def run(doc):
    return runner.run(spec_mod.parse(doc), progress=False)


def history(doc):
    return [json.loads(line) for line in open(doc["spec"]["output"]["path"] + "/history.jsonl")]


def search_entries(doc):
    return [e for e in history(doc) if e["text"] == "fitness" and not e["origin"].startswith("report:")]


def test_fresh_windows_are_drawn_from_the_whole_text_and_reproducible():
    ids = torch.arange(5000)
    fixed, wins = evaluate.select_windows(ids, 128, 512)
    assert fixed == [0, 1, 2, 3] and torch.equal(wins, ids[:512].view(4, 128))
    a, wa = evaluate.select_windows(ids, 128, 512, sample=7)
    b, wb = evaluate.select_windows(ids, 128, 512, sample=7)
    c, _ = evaluate.select_windows(ids, 128, 512, sample=8)
    assert a == b and torch.equal(wa, wb) and a != c
    assert len(a) == 4 and len(set(a)) == 4 and max(a) < 5000 // 128
    assert all(torch.equal(wa[i], ids[j * 128:(j + 1) * 128]) for i, j in enumerate(a))
    short, ws = evaluate.select_windows(ids, 128, 64, sample=7)  # a screen shorter than one window
    assert ws.shape == (1, 64) and short[0] < 5000 // 64
    # the seed of a screen depends on where it is, not on the search's random stream
    assert sample_seed(0, 3, 1) == sample_seed(0, 3, 1) != sample_seed(0, 3, 0) != sample_seed(1, 3, 1)


@pytest.mark.parametrize("strategy", ["genetic", "evopress"])
def test_stages_are_honoured_exactly(tiny_job, strategy):
    doc = tiny_job(f"stages-{strategy}", fitness={"stages": STAGES}, search={"strategy": strategy})
    result = run(doc)
    entries = search_entries(doc)
    by_tokens = Counter(e["tokens_budget"] for e in entries)
    if strategy == "genetic":  # 2 generations of 4 offspring: 4 on 128 tokens, 3 on 256, 1 in full
        assert by_tokens == {512: 4 + 2 * 1, 128: 2 * 4, 256: 2 * 3}
    else:  # EvoPress: the uniform parent, then steps of up to 16 mutants through the same stages
        steps = sorted({e["generation"] for e in entries if e["tokens_budget"] == 128})
        assert steps and by_tokens[512] == 1 + len(steps)
        for g in steps:
            here = Counter(e["tokens_budget"] for e in entries if e["generation"] == g)
            assert 3 < here[128] <= 16 and here[256] == 3 and here[512] == 1
    assert result["counters"]["screened_stage_0"] == by_tokens[128]
    assert result["counters"]["screened_stage_1"] == by_tokens[256]
    for e in entries:
        if e["tokens_budget"] < 512:
            assert e["sample"] is not None  # recorded: the windows are evaluate.select_windows(…, sample)
        else:
            assert "sample" not in e  # the last stage is the fixed full set
    # every screen of one generation and stage shares its windows; screens of others draw new ones
    samples = {(e["generation"], e["tokens_budget"]): set() for e in entries if "sample" in e}
    for e in entries:
        if "sample" in e:
            samples[(e["generation"], e["tokens_budget"])].add(e["sample"])
    assert all(len(s) == 1 for s in samples.values())
    assert len({next(iter(s)) for s in samples.values()}) == len(samples)


def test_screen_tokens_is_the_one_stage_special_case(tiny_job):
    from selfpruner.search import factory

    job = spec_mod.parse(tiny_job("legacy", fitness={"screenTokens": 128, "screenKeep": 0.5}))
    assert factory.stages(job) == [Stage(tokens=128, keep=0.5)]
    job = spec_mod.parse(tiny_job("staged", fitness={"stages": STAGES}))
    assert factory.stages(job) == [Stage(128, survivors=3), Stage(256, survivors=1)]


@pytest.mark.parametrize("strategy,stages", [("genetic", []), ("genetic", STAGES), ("random", []),
                                             ("evopress", []), ("evopress", STAGES)])
def test_every_strategy_stops_within_one_evaluation_of_its_token_budget(tiny_job, strategy, stages):
    budget = 512 * 23 + 300  # 23.6 full evaluations: more than the 12 that generations: 2 would make
    doc = tiny_job(f"budget-{strategy}-{len(stages)}", fitness={"stages": stages},
                   search={"strategy": strategy, "budget": {"tokens": budget}})
    result = run(doc)
    spent_tokens = sum(e["tokens_budget"] for e in search_entries(doc))
    assert result["cost"]["budget_full_evaluations"] == pytest.approx(budget / 512)
    assert spent_tokens <= budget
    # what is left would not pay for one more candidate through the stages and its full evaluation
    default = [{"tokens": 512 // 8}] if strategy == "evopress" and not stages else []  # EvoPress's own screen
    one = sum(s["tokens"] for s in stages or default) + 512
    assert budget - spent_tokens < one
    if strategy == "genetic":
        assert len(result["best_per_generation"]) > 3  # more generations than spec.search.generations (2)


def test_cheaper_screens_buy_more_generations(tiny_job):
    budget = {"tokens": 512 * 40}
    plain = run(tiny_job("plain", search={"budget": budget}))
    staged = run(tiny_job("staged", fitness={"stages": [{"tokens": 128, "survivors": 2}]}, search={"budget": budget}))
    # after the initial 4: a generation costs 4 full evaluations plain (9 of them), 4/4 + 2 = 3 staged (12)
    assert len(plain["best_per_generation"]) == 1 + 9
    assert len(staged["best_per_generation"]) == 1 + 12


def test_budget_in_full_evaluations_and_validation(tiny_job):
    doc = tiny_job("budget-evals", search={"budget": {"evaluations": 9.5}})
    result = run(doc)
    assert result["cost"]["budget_spent"] <= 9.5 + 1e-9 and 9.5 - result["cost"]["budget_spent"] < 1
    with pytest.raises(UserError, match="budget.tokens or budget.evaluations"):
        spec_mod.parse(tiny_job("both", search={"budget": {"tokens": 5000, "evaluations": 3}}))
    with pytest.raises(UserError, match="do not pay for the initial population of 4"):
        spec_mod.parse(tiny_job("small", search={"budget": {"tokens": 1024}}))
    with pytest.raises(UserError, match="every stage's tokens must be below tokens"):
        spec_mod.parse(tiny_job("wide", fitness={"stages": [{"tokens": 512, "survivors": 2}]}))
    with pytest.raises(UserError, match="give stages or screenTokens"):
        spec_mod.parse(tiny_job("mixed", fitness={"stages": STAGES, "screenTokens": 64}))


def test_kl_fitness_with_stages_end_to_end(tiny_job):
    doc = tiny_job("kl-staged", fitness={"metric": "kl", "topK": 8, "stages": STAGES})
    result = run(doc)
    assert result["fitness_text"]["metric"] == "kl" and result["fitness_text"]["top_k"] == 8
    assert abs(result["dense"]["fitness"]) < 1e-6  # the dense model against its own reference
    assert result["best"]["fitness"] > 0 and result["baselines"]["uniform"]["fitness"] > 0
    # held-out text is scored by perplexity whatever the fitness
    assert result["dense"]["held_out_perplexity"] > 1 and result["best"]["held_out_perplexity"] > 1
    screened = [e for e in search_entries(doc) if "sample" in e]
    assert screened and all(e["fitness"] >= -1e-6 for e in screened)


def test_llm_evolution_spends_its_token_budget(tiny_job):
    """The LLM's loop is the genetic one: it goes on past spec.search.generations until the budget
    is spent (a scripted OpenAI-compatible server over real HTTP plays the LLM)."""
    from chat_server import ScriptedChat

    budget = 512 * 17 + 100
    with ScriptedChat(dim=6) as server:
        doc = tiny_job("budget-llm", fitness={"stages": [{"tokens": 128, "survivors": 2}]},
                       search={"strategy": "llm-evolution", "budget": {"tokens": budget}},
                       llm={"provider": "openai", "model": "scripted", "baseURL": server.url, "offspringPerCall": 2})
        result = run(doc)
    spent = sum(e["tokens_budget"] for e in search_entries(doc))
    assert spent <= budget and budget - spent < 128 + 512
    assert len(result["best_per_generation"]) > 3  # generations: 2 in the spec
