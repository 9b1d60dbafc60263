"""The local backend: the demo's own SmolLM2-135M-Instruct proposes pruning rates.
A 135M model writes poor JSON; the point is that its proposals flow through the same
repair/replace path and the share it got right is recorded."""

import json

import pytest

from selfpruner import spec as spec_mod
from selfpruner.search import runner

pytestmark = pytest.mark.slow


def test_smollm2_runs_a_generation(tiny_job):
    doc = tiny_job("local-llm", search={"strategy": "llm-evolution", "population": 3, "generations": 1,
                                        "crossovers": 1, "mutations": 1},
                   llm={"provider": "local", "model": "demo", "maxTokens": 160, "offspringPerCall": 3,
                        "temperature": 0.7})
    result = runner.run(spec_mod.parse(doc), progress=False)
    llm = result["cost"]["llm"]
    assert llm["calls"] == 3  # initial population, crossover, mutation
    assert llm["completion_tokens"] > 0 and llm["prompt_tokens"] > 0
    assert llm["offspring_asked"] == 5
    assert llm["as_written_share"] is not None and 0 <= llm["as_written_share"] <= 1
    assert llm["offspring_used_as_written"] + llm["offspring_repaired"] + llm["offspring_replaced"] == 5
    transcript = [json.loads(line) for line in open(doc["spec"]["output"]["path"] + "/llm_transcript.jsonl")]
    assert all(e["reply"].startswith('{"candidates": [[') for e in transcript)
    assert result["best"]["fitness"] > 0
