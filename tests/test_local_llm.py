"""The local backend on the real demo model: SmolLM2-135M-Instruct, which wrote 3 usable
offspring of 330 unconstrained, writes only valid candidates under constrained decoding,
for shapes the demo uses and shapes it does not."""

import json

import pytest

from selfpruner import spec as spec_mod
from selfpruner.search import runner
from selfpruner.search.encoding import Codec, selection_schema
from selfpruner.search.llm_clients import LocalChat, Prompt
from selfpruner.search.replies import parse_candidates, parse_selection
from selfpruner.search.space import SearchSpace

pytestmark = pytest.mark.slow


def test_demo_model_replies_have_the_exact_shape():
    chat = LocalChat("demo", temperature=0.8, seed=0)
    shapes = [(30, 2, False, 0.6), (30, 1, True, 0.6), (7, 3, False, 0.9), (16, 2, True, 0.5)]
    prompts, spaces = [], []
    for blocks, count, separate, hi in shapes:
        space = SearchSpace(num_blocks=blocks, ratio=0.3, max_rate=hi, separate=separate)
        spaces.append((space, count))
        prompts.append(Prompt([{"role": "user", "content": f"Write {count} lists of {blocks} pruning percents "
                                                           "averaging 30, as JSON."}],
                              Codec(space).reply_schema(count)))
    prompts.append(Prompt([{"role": "user", "content": "Pick 2 pairs and 1 single from candidates 1 to 5."}],
                          selection_schema(2, 1, 5)))
    outcomes = chat.chat_many(prompts)
    for (space, count), o in zip(spaces, outcomes):
        items = parse_candidates(o.reply.text)
        assert json.loads(o.reply.text) and len(items) == count
        assert all(Codec(space).decode(raw)[1] for raw in items), o.reply.text
    sel = parse_selection(outcomes[-1].reply.text)
    assert len(sel["crossover"]) == 2 and len(sel["mutation"]) == 1


def test_smollm2_runs_the_evolution_with_every_offspring_valid(tiny_job):
    doc = tiny_job("local-llm", search={"strategy": "llm-evolution", "population": 3, "generations": 1,
                                        "crossovers": 1, "mutations": 1},
                   llm={"provider": "local", "model": "demo", "offspringPerCall": 1, "temperature": 0.7})
    result = runner.run(spec_mod.parse(doc), progress=False)
    llm = result["cost"]["llm"]
    assert llm["calls"] == 3 + 1 + 2  # initial population, selection, one crossover and one mutation
    assert llm["batches"] == 3  # initial; selection; offspring
    assert llm["completion_tokens"] > 0 and llm["prompt_tokens"] > 0
    assert llm["offspring_asked"] == 5
    assert llm["unparseable_replies"] == llm["offspring_replaced"] == llm["offspring_repaired"] == 0
    assert llm["selections_repaired"] == 0
    assert llm["offspring_used"] + llm["offspring_duplicates"] == 5
    assert result["best"]["fitness"] > 0
