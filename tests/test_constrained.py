"""Constrained decoding (llguidance) on a tiny random chat model: every reply is valid JSON of
exactly the asked shape, within bounds and on the grid, whatever the model's weights; a batch
equals the same prompts one at a time at temperature 0. The encoding round-trips."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_chat_model
from selfpruner.search.encoding import Codec, selection_schema
from selfpruner.search.llm_clients import LocalChat, Prompt
from selfpruner.search.replies import parse_candidates, parse_selection
from selfpruner.search.space import SearchSpace

SHAPES = [  # (blocks, count, separate rates, grid, max rate)
    (6, 1, False, 0.01, 0.6),
    (4, 3, True, 0.01, 0.6),
    (30, 2, False, 0.01, 0.8),
    (12, 2, False, 0.05, 0.5),  # a coarser grid: integer percents from an enum
    (5, 2, False, 0.005, 0.6),  # finer than 1 %: decimals
]


@pytest.fixture(scope="module")
def loaded():
    return tiny_chat_model()


def prompts_for(shapes):
    out = []
    for blocks, count, separate, grid, hi in shapes:
        space = SearchSpace(num_blocks=blocks, ratio=0.3, max_rate=hi, grid=grid, separate=separate)
        out.append((space, count, Prompt([{"role": "user", "content": f"write {count} candidates"}],
                                         Codec(space).reply_schema(count))))
    return out


def check(space, count, text):
    items = parse_candidates(text)
    assert items is not None and len(items) == count, text
    codec = Codec(space)
    for raw in items:
        rates, clean = codec.decode(raw)
        assert clean, (raw, text)  # right shape, in bounds, on the grid, as written
        assert rates.shape == (space.dim,)
        assert np.all(rates >= space.min_rate - 1e-9) and np.all(rates <= space.max_rate + 1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_reply_has_the_exact_shape(loaded, seed):
    chat = LocalChat(loaded=loaded, temperature=1.0, seed=seed)
    cases = prompts_for(SHAPES)
    outcomes = chat.chat_many([p for _, _, p in cases])
    for (space, count, _), o in zip(cases, outcomes):
        check(space, count, o.reply.text)
        assert json.loads(o.reply.text)  # valid JSON, not only salvageable


def test_selection_replies_are_valid_indices(loaded):
    chat = LocalChat(loaded=loaded, temperature=1.0, seed=3)
    outcomes = chat.chat_many([Prompt([{"role": "user", "content": "choose"}], selection_schema(3, 2, 7))] * 4)
    for o in outcomes:
        data = parse_selection(o.reply.text)
        assert len(data["crossover"]) == 3 and all(len(p) == 2 for p in data["crossover"])
        assert len(data["mutation"]) == 2
        assert all(1 <= i <= 7 for p in data["crossover"] for i in p) and all(1 <= i <= 7 for i in data["mutation"])


def test_a_batch_equals_one_prompt_at_a_time_greedy(loaded):
    chat = LocalChat(loaded=loaded, temperature=0.0)
    prompts = [p for _, _, p in prompts_for(SHAPES)]
    batched = [o.reply.text for o in chat.chat_many(prompts)]
    alone = [chat.chat_many([p])[0].reply.text for p in prompts]
    assert batched == alone
    small = LocalChat(loaded=loaded, temperature=0.0, batch_size=2)  # split into several generate calls
    assert [o.reply.text for o in small.chat_many(prompts)] == batched


def test_sampling_is_reproducible(loaded):
    prompts = [p for _, _, p in prompts_for(SHAPES[:2])]
    a = [o.reply.text for o in LocalChat(loaded=loaded, temperature=0.9, seed=5).chat_many(prompts)]
    b = [o.reply.text for o in LocalChat(loaded=loaded, temperature=0.9, seed=5).chat_many(prompts)]
    assert a == b


def test_a_model_without_a_chat_template_is_refused(loaded):
    from selfpruner.errors import UserError
    from selfpruner.model_source import Loaded

    bare = loaded.tokenizer.__class__(tokenizer_object=loaded.tokenizer.backend_tokenizer, eos_token="</s>")
    with pytest.raises(UserError, match="no chat template"):
        LocalChat(loaded=Loaded(loaded.model, bare, "", "bare"))


@pytest.mark.parametrize("blocks, separate, grid", [(6, False, 0.01), (4, True, 0.01), (8, False, 0.05),
                                                    (5, False, 0.005)])
def test_encoding_round_trips(blocks, separate, grid):
    space = SearchSpace(num_blocks=blocks, ratio=0.3, max_rate=0.6, grid=grid, separate=separate)
    rng = np.random.default_rng(0)
    codec = Codec(space)
    for _ in range(5):
        units = space.random(rng)
        rates, clean = codec.decode(json.loads(codec.fmt(units)))
        assert clean and np.allclose(rates, space.rates(units))
        assert np.array_equal(space.project(rates), units)


def test_decode_flags_what_is_not_valid_as_written():
    codec = Codec(SearchSpace(num_blocks=4, ratio=0.3, max_rate=0.6))
    assert codec.decode([30, 30, 30, 30])[1] is True
    assert codec.decode([30, 30, 30, 90])[1] is False  # out of bounds
    assert codec.decode([0.3, 0.3, 0.3, 0.3]) == (pytest.approx(np.full(4, 0.3)), False)  # fractions, read anyway
    assert codec.decode([30, 30, 30])[0] is None  # wrong length
    assert codec.decode(["30", 30, 30, 30])[0] is None
    assert codec.fmt(np.array([30, 25, 0, 60])) == "[30,25,0,60]"


def test_percent_encoding_halves_the_tokens_of_a_candidate(loaded):
    """With a tokenizer that splits digits (as SmolLM2's and Qwen2.5's do), integer percents
    take about half the tokens of two-decimal fractions (docs/search.md has the measured counts)."""
    tok = loaded.tokenizer
    space = SearchSpace(num_blocks=30, ratio=0.3, max_rate=0.6)
    units = space.random(np.random.default_rng(0))
    old = "[" + ", ".join(f"{r:.2f}" for r in space.rates(units)) + "]"
    new = Codec(space).fmt(units)
    assert len(tok(new).input_ids) < 0.55 * len(tok(old).input_ids)


def test_a_hugging_face_folder_runs_the_evolution(tiny_job, tmp_path):
    """llm.model names a folder: the model loads with its own chat template, decodes under the
    schemas, and every offspring it writes is valid as written (used, or a counted duplicate)."""
    from selfpruner import spec as spec_mod
    from selfpruner.search import runner

    chat = tiny_chat_model(seed=1)
    folder = tmp_path / "tiny-chat"
    chat.model.save_pretrained(folder)
    chat.tokenizer.save_pretrained(folder)
    # the paper's allocation (every offspring the LLM's), so that every call can be counted
    doc = tiny_job("folder-llm", search={"strategy": "llm-evolution"},
                   llm={"provider": "local", "model": str(folder), "temperature": 1.0, "allocation": "fixed"})
    result = runner.run(spec_mod.parse(doc), progress=False)
    llm = result["cost"]["llm"]
    assert llm["unparseable_replies"] == llm["offspring_repaired"] == 0
    assert llm["offspring_replaced"] == llm["offspring_duplicates_kept"]  # only repeats still not new when asked again
    assert llm["selections"] + llm["selections_repaired"] == 2 * (2 * 2 + 2)  # every pick accounted for
    assert llm["offspring_used"] + llm["offspring_duplicates_kept"] == llm["offspring_asked"] == 4 + 2 * 4
    entries = [json.loads(line) for line in open(Path(doc["spec"]["output"]["path"]) / "llm_transcript.jsonl")]
    asked_again = {e["batch"] for e in entries if e["kind"].endswith("-again")}
    assert llm["batches"] == 1 + 2 * 2 + len(asked_again) and len(result["generations"]) == 3
