"""`llm.evidence`: what the LLM's selection, crossover and mutation prompts show besides the population
(search/evidence.py) -- the calibration statistics, the rank correlation of each position's rate with the
fitness over the search's history, and what the LLM's own last offspring scored. The numbers in the prompts
are checked against the run's own record (history.jsonl, state.json) and scipy; without evidence the
prompts are the paper's; a resumed search writes the same prompts. Over a real HTTP chat server
(tests/chat_server.py) and the tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from chat_server import ScriptedChat
from selfpruner import spec as spec_mod
from selfpruner.errors import UserError
from selfpruner.search import evidence, runner

DIM = 6
ALL = ["calibration", "correlations", "feedback"]
# the first line of each paragraph of the paper's prompts (the templates before llm.evidence)
PAPER = {
    "selection": ["We prune ", "The current population, numbered 1 to 8:",
                  "Choose the parents of the next generation:"],
    "crossover": ["We prune ", "The best candidates found so far:", "Cross over each pair of parents below",
                  "Reply with JSON only, one child per pair, in order:"],
    "mutation": ["We prune ", "The best candidates found so far:", "Mutate each parent below into one new candidate",
                 "Reply with JSON only, one mutant per parent, in order:"],
}


def job(tiny_job, name, url, evidence_items=None, **search):
    # the endpoint is a local server: a long timeout only keeps a loaded machine from losing a call
    llm = {"provider": "openai", "model": "scripted", "baseURL": url, "timeoutSeconds": 60, "maxRetries": 1,
           "allocation": "fixed", "offspringPerCall": 2}
    if evidence_items is not None:
        llm["evidence"] = evidence_items
    return tiny_job(name, search={"strategy": "llm-evolution", "population": 8, "generations": 2, "crossovers": 4,
                                  "mutations": 4, "seed": 3, **search}, llm=llm)


def transcript(doc) -> list[dict]:
    return [json.loads(line) for line in open(Path(doc["spec"]["output"]["path"]) / "llm_transcript.jsonl")]


def prompt(entry: dict) -> str:
    return entry["messages"][1]["content"]


def paragraph(text: str, start: str) -> str:
    (found,) = [p for p in text.split("\n\n") if p.startswith(start)]
    return found


def numbers(text: str) -> list[float | None]:
    return [None if v == "null" else float(v) for v in re.findall(r"-?\d+\.\d+|null", text)]


# -- the spec -------------------------------------------------------------------------------------


def test_evidence_defaults_to_none_and_refuses_unknown_items_and_repeats(tiny_job):
    assert spec_mod.parse(tiny_job("t")).spec.llm.evidence == []  # the prompts measured so far
    assert spec_mod.parse(tiny_job("t", llm={"evidence": ALL})).spec.llm.evidence == ALL
    with pytest.raises(UserError, match=r"spec\.llm\.evidence\[0\]: 'gossip' is not one of"):
        spec_mod.parse(tiny_job("t", llm={"evidence": ["gossip"]}))
    with pytest.raises(UserError, match=r"spec\.llm\.evidence: .*non-unique"):
        spec_mod.parse(tiny_job("t", llm={"evidence": ["feedback", "feedback"]}))
    assert tuple(spec_mod.schema()["properties"]["spec"]["properties"]["llm"]["properties"]["evidence"]["items"]
                 ["enum"]) == evidence.ITEMS


# -- the helpers, on histories whose answer is plain ----------------------------------------------


def test_correlations_say_where_pruning_hurt():
    # position 0: more pruning, worse fitness; position 1: more pruning, better; position 2 never varies
    evaluated = [[[k, 9 - k, 3], 10.0 + k] for k in range(10)]
    text = evidence.correlations(evaluated, None, "perplexity")
    assert text.endswith(": [1.00,-1.00,null]\n\n") and "the 10 candidates evaluated so far" in text
    assert "positive: pruning more there went with worse, higher perplexity" in text
    assert evidence.correlations(evaluated[:evidence.MIN_EVALUATIONS - 1], None, "perplexity") == ""  # too few
    separate = [[[k, 0, 9 - k, k % 3], 10.0 + k] for k in range(10)]  # attention 0..1, then mlp 0..1
    assert '{"attention":[1.00,null],"mlp":[-1.00,' in evidence.correlations(separate, 2, "KL")


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.integers(0, 4, 30)  # grid rates tie a lot
        y = rng.normal(size=30) + 0.3 * x
        assert evidence.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)


def test_feedback_lists_each_offspring_and_the_total():
    fates = [{"generation": 1, "kind": "mutation", "fitness": 110.0, "parent": 100.0, "entered": False},
             {"generation": 1, "kind": "crossover", "fitness": 95.0, "parent": 100.0, "entered": True},
             {"generation": 1, "kind": "crossover", "fitness": None, "parent": 90.0, "entered": False}]
    text = evidence.feedback(fates, "perplexity", ".3f")
    assert text == ("What your own crossovers and mutations of the last generation scored (perplexity, lower is "
                    "better):\n"
                    "- crossover 1: 95.000 vs better parent 100.000 (-5.00 %), entered\n"
                    "- crossover 2: not evaluated in full (screened out or failed), better parent 90.000, not entered\n"
                    "- mutation 1: 110.000 vs better parent 100.000 (+10.00 %), not entered\n"
                    "In all, 1 of 3 entered the population; mean change of perplexity against the better parent "
                    "+2.50 %.\n\n")
    assert evidence.feedback([], "perplexity", ".3f") == ""


# -- in a search ----------------------------------------------------------------------------------


def test_without_evidence_the_prompts_are_the_papers(tiny_job):
    with ScriptedChat(dim=DIM) as server:
        doc = job(tiny_job, "plain", server.url)
        runner.run(spec_mod.parse(doc), progress=False)
    seen = set()
    for entry in transcript(doc):
        kind = entry["kind"]
        if kind in PAPER:
            text = prompt(entry)
            assert "\n\n\n" not in text and not text.startswith("\n")
            assert [p.splitlines()[0][:len(s)] for p, s in zip(text.split("\n\n"), PAPER[kind])] == PAPER[kind]
            assert len(text.split("\n\n")) == len(PAPER[kind]), text
            seen.add(kind)
    assert seen == set(PAPER)


def test_the_prompts_hold_the_searchs_evidence_and_a_resumed_search_writes_the_same(tiny_job):
    with ScriptedChat(dim=DIM) as server:
        ref = job(tiny_job, "reference", server.url, ALL)
        runner.run(spec_mod.parse(ref), progress=False)
        doc = job(tiny_job, "resumed", server.url, ALL)
        assert runner.run(spec_mod.parse(doc), progress=False, stop_after_generation=1)["interrupted"]
        after_first = json.loads((Path(doc["spec"]["output"]["path"]) / "state.json").read_text())
        runner.run(spec_mod.parse(doc), progress=False)
    entries = transcript(doc)
    assert [e["messages"] for e in entries] == [e["messages"] for e in transcript(ref)]  # the same prompts

    out = Path(doc["spec"]["output"]["path"])
    history = [json.loads(line) for line in open(out / "history.jsonl")]
    searched = [e for e in history if not e["origin"].startswith("report:") and e["fitness"] is not None]
    assert all(e["tokens_budget"] == 512 and "sample" not in e for e in searched)  # no screens here
    initial = prompt(next(e for e in entries if e["kind"] == "initial"))
    batches = [e for e in entries if e["kind"] in ("selection", "crossover", "mutation")]
    generation = {b: g + 1 for g, b in enumerate(sorted({e["batch"] for e in batches if e["kind"] == "selection"}))}
    for e in batches:  # a generation's offspring batch follows its selection
        if e["batch"] not in generation:
            generation[e["batch"]] = max(g for b, g in generation.items() if b < e["batch"])

    # calibration: the statistics of the initial prompt's lines, as two lists
    stats = re.findall(r"block \d+: outlier ratio (\d+\.\d+)%, relative activation size (\d+\.\d+)", initial)
    assert len(stats) == DIM
    for e in batches:
        text = paragraph(prompt(e), "Calibration statistics per block")
        assert numbers(text) == [float(o) for o, _ in stats] + [float(r) for _, r in stats]

    # correlations: Spearman over the full evaluations of the generations before, by scipy
    for e in batches:
        g = generation[e["batch"]]
        before = [h for h in searched if h["generation"] < g]
        rates = np.array([h["rates"] for h in before])
        fitness = [h["fitness"] for h in before]
        expected = [round(spearmanr(rates[:, p], fitness).statistic, 2) for p in range(DIM)]
        text = paragraph(prompt(e), f"What the {len(before)} candidates evaluated so far say")
        assert numbers(text.split("never varied): ")[1]) == pytest.approx(expected, abs=0.0051)

    # feedback: generation 1's LLM offspring, their fitness, and how many entered (state after generation 1)
    assert not any("What your own" in prompt(e) for e in batches if generation[e["batch"]] == 1)
    mine = [h for h in searched if h["generation"] == 1 and h["origin"] != "classical"]
    entered = {m["fitness"] for m in after_first["strategy"]["population"]} & {h["fitness"] for h in mine}
    parents = {f"{h['fitness']:.3f}" for h in searched if h["generation"] == 0}
    offspring = [e for e in batches if generation[e["batch"]] == 2 and e["kind"] in ("crossover", "mutation")]
    assert offspring and all("What your own" not in prompt(e) for e in batches if e["kind"] == "selection")
    for e in offspring:
        text = paragraph(prompt(e), "What your own crossovers and mutations")
        lines = re.findall(r"^- (crossover|mutation) \d+: (\d+\.\d+) vs better parent (\d+\.\d+)", text,
                           flags=re.MULTILINE)
        assert sorted(f for _, f, _ in lines) == sorted(f"{h['fitness']:.3f}" for h in mine)
        assert {p for _, _, p in lines} <= parents  # the better parent is one of generation 0
        assert f"In all, {len(entered)} of {len(mine)} entered the population" in text


def test_edits_and_screens_get_the_evidence_too(tiny_job):
    """The edit prompts carry the same paragraphs; an offspring screened out is in the feedback as such."""
    with ScriptedChat(dim=DIM) as server:
        doc = job(tiny_job, "edits", server.url, ALL)
        doc["spec"]["llm"]["operators"] = "edits"
        doc["spec"]["fitness"]["screenTokens"] = 128
        runner.run(spec_mod.parse(doc), progress=False)
    entries = [e for e in transcript(doc) if e["kind"] in ("crossover", "mutation")]
    assert {"take", "moves"} == {next(iter(e["schema"]["properties"])) for e in entries}
    assert all("Calibration statistics per block" in prompt(e) and "candidates evaluated so far say" in prompt(e)
               for e in entries)
    history = [json.loads(line) for line in open(Path(doc["spec"]["output"]["path"]) / "history.jsonl")]
    mine = [h for h in history if h["generation"] == 1 and h["origin"] != "classical"]
    full = {json.dumps(h["rates"]) for h in mine if "sample" not in h}
    screened_out = {json.dumps(h["rates"]) for h in mine if "sample" in h} - full
    assert screened_out and full  # the screen kept half
    last = prompt(entries[-1])
    assert last.count("not evaluated in full (screened out or failed)") == len(screened_out)
    assert f"of {len(screened_out) + len(full)} entered the population" in last
