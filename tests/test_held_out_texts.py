"""Held-out text from several domains (`fitness.heldOutTexts`): each scored by perplexity for the
dense model, the baselines and the best candidate, with the geometric mean over all held-out texts,
on a tiny real model end to end; refused where it would be text the search sees."""

from __future__ import annotations

import json
import math

import pytest

from selfpruner import spec as spec_mod
from selfpruner.cluster import policy
from selfpruner.errors import UserError
from selfpruner.search import runner
from selfpruner.search.finish import geometric_mean
from selfpruner.search.report import summary_table
from tests.conftest import ALPHABET, _random_text


def run(doc, **kw):
    return runner.run(spec_mod.parse(doc), progress=False, **kw)


@pytest.fixture
def domains(tmp_path):
    """A copy of the held-out text under another name (must score exactly the same), and a text of
    another 'domain': three characters of the alphabet only, which the tiny model finds far from
    the uniform mix it sees elsewhere."""
    def make(doc):
        held = doc["spec"]["fitness"]["heldOutText"]
        copy = tmp_path / "heldout-copy.txt"
        copy.write_text(open(held).read())
        other = tmp_path / "other-domain.txt"
        other.write_text("".join(c for c in _random_text(99, 40000) if c in ALPHABET[:3])[:5000])
        return str(copy), str(other)
    return make


@pytest.mark.parametrize("metric", ["perplexity", "kl"])
def test_every_held_out_text_is_scored_by_perplexity_for_every_row_with_the_geometric_mean(tiny_job, domains, metric):
    doc = tiny_job(f"held-{metric}", search={"strategy": "genetic", "population": 4, "generations": 1,
                                             "baselines": ["uniform"]})
    copy, other = domains(doc)
    doc["spec"]["fitness"].update(heldOutTexts=[copy, other], metric=metric)
    result = run(doc)

    assert [t["text"] for t in result["held_out_texts"]] == [doc["spec"]["fitness"]["heldOutText"], copy, other]
    assert all(t["tokens"] > 0 and t["tokens_asked"] == 1024 for t in result["held_out_texts"])
    for row in (result["dense"], result["best"], result["baselines"]["uniform"]):
        first, same, third = row["held_out_perplexities"]
        assert row["held_out_perplexity"] == first
        assert same == pytest.approx(first, rel=1e-6)  # the same text under another name: perplexity, never KL
        assert third != pytest.approx(first, rel=1e-3)
        assert row["held_out_geometric_mean"] == pytest.approx((first * same * third) ** (1 / 3))
    # the report's evaluations are in the history, one per (row, text), labelled by position
    history = [json.loads(line) for line in open(doc["spec"]["output"]["path"] + "/history.jsonl")]
    report = [e for e in history if e["origin"].startswith("report:") and e["text"].startswith("heldout")]
    assert sorted({e["text"] for e in report}) == ["heldout", "heldout-2", "heldout-3"]
    assert len(report) == 3 * 3  # dense, uniform, best

    table = summary_table(result)
    assert "held-out 1" in table and "held-out 3" in table and "geo-mean" in table
    assert f"held-out 3: {other}" in table


def test_one_held_out_text_keeps_the_one_column_report(tiny_job):
    result = run(tiny_job("held-one", search={"strategy": "uniform"}))
    assert len(result["held_out_texts"]) == 1
    assert result["best"]["held_out_geometric_mean"] == pytest.approx(result["best"]["held_out_perplexity"])
    table = summary_table(result)
    assert "held-out ppl" in table and "geo-mean" not in table


def test_the_geometric_mean_needs_every_text():
    assert geometric_mean([4.0, 9.0]) == pytest.approx(6.0)
    assert geometric_mean([4.0, None]) is None
    assert geometric_mean([4.0, math.inf]) is None
    assert geometric_mean([]) is None


def test_a_held_out_text_that_is_the_fitness_or_calibration_text_is_refused(tiny_job):
    doc = tiny_job("bad")
    f = doc["spec"]["fitness"]
    for bad, field in ((f["text"], "heldOutTexts must differ from text"),
                       (f["heldOutText"], "heldOutTexts must differ from text and from heldOutText"),
                       (doc["spec"]["calibration"]["text"], "fitness.heldOutTexts must differ from calibration.text")):
        doc["spec"]["fitness"]["heldOutTexts"] = [bad]
        with pytest.raises(UserError, match=field):
            spec_mod.parse(doc)
    doc["spec"]["fitness"]["heldOutTexts"] = ["a.txt", "a.txt"]
    with pytest.raises(UserError, match="heldOutTexts"):
        spec_mod.parse(doc)  # a repeat would be scored twice and weigh twice in the mean
    doc["spec"]["fitness"]["heldOutTexts"] = [f"t{i}.txt" for i in range(9)]
    with pytest.raises(UserError, match="heldOutTexts"):
        spec_mod.parse(doc)


def test_a_missing_held_out_text_is_one_line_naming_its_field_before_any_weights_load(tiny_job, tmp_path):
    doc = tiny_job("missing")
    doc["spec"]["fitness"]["heldOutTexts"] = [str(tmp_path / "nowhere.txt")]
    with pytest.raises(UserError) as e:
        run(doc)
    assert "nowhere.txt does not exist" in str(e.value) and "\n" not in str(e.value)


def test_tenant_names_a_demo_text_among_the_held_out_texts_on_a_cluster_and_is_refused():
    spec = {"model": {"source": "s3://models/llama"}, "target": {"ratio": 0.3}, "storage": {"uri": "s3://runs/a"},
            "llm": {"provider": "openai", "model": "m"},
            "calibration": {"text": "s3://texts/calibration.txt"},
            "fitness": {"text": "s3://texts/fitness.txt", "heldOutText": "s3://texts/heldout.txt",
                        "heldOutTexts": ["s3://texts/code.txt", "demo:heldout"]}}
    with pytest.raises(UserError) as e:
        policy.check(spec, {}, {"storage": {"uri": "s3://runs"}}, "registry.example/pruner:1")
    assert str(e.value).startswith("spec.fitness.heldOutTexts[1]: demo texts")


def test_demo_calibration_mixes_shakespeare_and_code_from_its_first_window_and_no_evaluation_text_holds_either():
    """The default calibration text (docs/benchmarks.md §12): calibration windows come from the start of
    the text, so both domains must be there within a few thousand characters."""
    from selfpruner import corpus

    mix = corpus.load_text("demo:calibration")
    code = corpus.load_text("demo:code")
    shakespeare = corpus.load_text("demo:calibration-shakespeare")
    start = mix[:3 * corpus.MIX_BLOCK]
    assert "def " in start and "import " in start  # code
    assert start.startswith(shakespeare[:200])  # then Shakespeare's calibration works
    assert code[:2000] in mix and shakespeare[-100:] not in code
    reference = corpus.load_text("demo:python-reference")
    assert "assert_stmt" in reference  # the language reference, from the running Python itself
    for other in ("demo:fitness", "demo:heldout", "demo:python-reference"):
        text = corpus.load_text(other)
        assert code[:2000] not in text and shakespeare[:2000] not in text
        assert reference[:2000] not in mix
    with pytest.raises(UserError, match="demo:calibration-shakespeare"):
        corpus.load_text("demo:shakespeare")


def test_demo_fitness_mix_holds_shakespeare_and_code_that_calibration_and_held_out_text_do_not():
    """The fitness text of two domains (docs/benchmarks.md §15): the fitness works and another project's
    code, both within the first windows, and no line of it in calibration or held-out text."""
    from selfpruner import corpus

    mix = corpus.load_text("demo:fitness-mix")
    works = corpus.load_text("demo:fitness")
    start = mix[:3 * corpus.MIX_BLOCK]
    assert start.startswith(works[:200]) and "def " in start and "import " in start
    cut = works.find("\n", corpus.MIX_BLOCK) + 1  # where the first block of code begins
    code = mix[cut:cut + 2000]
    assert mix[:cut] == works[:cut] and code.startswith('"""\nClick is')
    for other in ("demo:calibration", "demo:heldout", "demo:python-reference"):
        text = corpus.load_text(other)
        assert code not in text and works[:2000] not in text
