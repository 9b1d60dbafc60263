"""llm-evolution against a real local HTTP server speaking the chat-completions protocol
(with structured outputs, scripted misbehaviour and refusals); parsing of replies; the
per-origin table; the transcript."""

import json

import pytest

from chat_server import ScriptedChat, good_candidates
from selfpruner import spec as spec_mod
from selfpruner.search import runner
from selfpruner.search.replies import parse_candidates

DIM = 6


def llm_job(tiny_job, name, url, search=None, **extra):
    """The paper's llm-evolution (`allocation: fixed`: every offspring the LLM's), so that these
    tests count the LLM's calls exactly; the shared allocation is tests/test_allocation.py's. The
    endpoint is a local server: a long timeout only keeps a loaded machine from losing a call (the
    test of timeouts sets its own)."""
    return tiny_job(name, search={"strategy": "llm-evolution", **(search or {})},
                    llm={"provider": "openai", "model": "scripted", "baseURL": url, "timeoutSeconds": 30,
                         "maxRetries": 2, "offspringPerCall": 2, "allocation": "fixed", **extra})


def transcript(doc):
    return [json.loads(line) for line in open(doc["spec"]["output"]["path"] + "/llm_transcript.jsonl")]


def test_search_survives_a_misbehaving_server(tiny_job):
    script = [
        ("status", 429), ("reply", good_candidates("a", 2, DIM)),  # 429 then 200: the SDK retries
        ("reply", json.dumps({"candidates": [[30] * 4, [90, 90, 0, 0, 0, 0]]})),  # wrong length; out of range
        ("status", 500), ("status", 500), ("status", 500),  # selection: out of retries, the call fails
        ("reply", "I think block 3 matters most."),  # crossovers: garbage
        ("reply", '{"candidates": [[10, 20, 30'),  # mutations: truncated JSON
        ("sleep", 2.0, "{}"), ("sleep", 2.0, "{}"), ("sleep", 2.0, "{}"),  # selection of generation 2: timeouts
    ]
    with ScriptedChat(script, dim=DIM) as server:
        # one at a time: the script's order; 0.5 s: the sleeps of 2 s above time out
        doc = llm_job(tiny_job, "misbehaving", server.url, concurrency=1, timeoutSeconds=0.5)
        result = runner.run(spec_mod.parse(doc), progress=False)
        sent = len(server.requests)
    counters = result["counters"]
    llm = result["cost"]["llm"]
    # initial population in 2 calls, then per generation: one selection, one crossover and one mutation call
    assert llm["calls"] == 2 + 2 * 3
    assert llm["batches"] == 1 + 2 * 2  # the initial prompts together; per generation selection, then offspring
    assert sent == llm["calls"] + 1 + 2 + 2  # one retry after the 429, two after 500s, two after timeouts
    assert llm["failed_calls"] == 2 == counters["llm_failed_calls"]
    assert llm["unparseable_replies"] == 2
    assert llm["offspring_replaced"] == 1 + 2 + 2  # wrong length; garbage; truncated
    assert llm["offspring_repaired"] == 1  # out of range: projected
    assert llm["selections_repaired"] == 2 * 6  # both failed selections fell back to tournaments
    assert llm["offspring_asked"] == 4 + 2 * 4
    assert llm["offspring_used"] == 2 + 4 - llm["offspring_duplicates"]
    assert llm["projection_mean_abs_change"] is not None
    origins = result["origins"]
    assert origins["classical"]["made"] == 5 and origins["repaired"]["made"] >= 1
    assert sum(o["made"] for o in origins.values()) == 4 + 2 * 4
    assert result["best"]["fitness"] > 0
    entries = transcript(doc)
    assert len(entries) == llm["calls"]
    assert sum(1 for e in entries if e["error"]) == 2
    assert all(e["messages"][0]["role"] == "system" for e in entries)


def test_strict_schema_is_sent_and_every_offspring_is_used(tiny_job):
    with ScriptedChat(dim=DIM) as server:
        doc = llm_job(tiny_job, "strict", server.url)
        result = runner.run(spec_mod.parse(doc), progress=False)
        bodies = list(server.requests)
    for body in bodies:
        rf = body["response_format"]
        assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
        schema = rf["json_schema"]["schema"]
        if "candidates" in schema["properties"]:
            cands = schema["properties"]["candidates"]
            assert cands["minItems"] == cands["maxItems"] == 2
            assert cands["items"]["minItems"] == cands["items"]["maxItems"] == DIM
            assert cands["items"]["items"] == {"type": "integer", "minimum": 0, "maximum": 60}
        else:
            assert schema["properties"]["crossover"]["minItems"] == 2
            assert schema["properties"]["mutation"]["items"] == {"type": "integer", "minimum": 1, "maximum": 4}
    llm = result["cost"]["llm"]
    assert llm["refused_response_formats"] == []
    assert llm["offspring_replaced"] == llm["offspring_repaired"] == llm["unparseable_replies"] == 0
    assert llm["selections"] == 2 * 6 and llm["selections_repaired"] == 0
    # a repeat of an evaluated candidate is asked for again (this server then writes a new one)
    assert llm["offspring_used"] + llm["offspring_duplicates_kept"] == llm["offspring_asked"] == 12
    assert llm["offspring_duplicates"] == llm["offspring_new_when_asked_again"] + llm["offspring_duplicates_kept"]
    # the server's candidates are feasible as written: projection moved nothing
    assert llm["projection_max_abs_change"] == 0
    assert set(result["origins"]) <= {"llm-initial", "llm-crossover", "llm-mutation", "repaired"}
    # the summary says it too
    assert "offspring used as written: " in runner.report.summary_table(result)


@pytest.mark.parametrize("refuse, expected", [(("json_schema",), "json_object"),
                                              (("json_schema", "json_object"), "text")])
def test_response_format_falls_back_and_remembers(tiny_job, refuse, expected):
    with ScriptedChat(dim=DIM, refuse=refuse) as server:
        result = runner.run(spec_mod.parse(llm_job(tiny_job, "fallback", server.url, concurrency=1)), progress=False)
        bodies = list(server.requests)
    llm = result["cost"]["llm"]
    assert llm["refused_response_formats"] == list(refuse)  # each refusal once: remembered
    sent = [(b.get("response_format") or {}).get("type", "text") for b in bodies]
    assert sent[: len(refuse)] == list(refuse)
    assert set(sent[len(refuse):]) == {expected}
    # nothing lost to the fallback (a repeat still not new after asking again is replaced, counted apart)
    assert llm["failed_calls"] == 0 and llm["offspring_replaced"] == llm["offspring_duplicates_kept"]
    assert all(e["response_format"] == expected for e in transcript(llm_job(tiny_job, "fallback", server.url)))


def test_a_generation_goes_out_as_concurrent_requests(tiny_job):
    with ScriptedChat(dim=DIM, delay=0.2) as server:
        doc = llm_job(tiny_job, "concurrent", server.url, offspringPerCall=1, concurrency=4)
        result = runner.run(spec_mod.parse(doc), progress=False)
        most = server.max_in_flight
    assert most == 4  # 4 initial prompts, then 2 + 2 offspring prompts: never more than the bound
    entries = transcript(doc)
    batches = {}
    for e in entries:
        batches.setdefault(e["batch"], []).append(e["kind"])
    # this server answers a prompt the same each time: repeats are asked for again, in a batch of their own
    again = [kinds for kinds in batches.values() if kinds[0].endswith("-again")]
    assert all(k.endswith("-again") for kinds in again for k in kinds)
    assert sum(map(len, again)) == result["cost"]["llm"]["offspring_duplicates"]
    first = [kinds for kinds in batches.values() if not kinds[0].endswith("-again")]
    assert first == [["initial"] * 4] + [["selection"], ["crossover"] * 2 + ["mutation"] * 2] * 2
    gens = result["generations"]
    assert len(gens) == 3 and all(g["llm_seconds"] > 0 and g["evaluation_seconds"] > 0 for g in gens)


def test_llm_selection_is_repaired_and_can_be_turned_off(tiny_job):
    bad = json.dumps({"crossover": [[1, 1], [9, 4]], "mutation": [0, 2]})  # repeated, out of range, zero
    with ScriptedChat([("reply", good_candidates("a", 2, DIM)), ("reply", good_candidates("b", 2, DIM)),
                       ("reply", bad)], dim=DIM) as server:
        result = runner.run(spec_mod.parse(llm_job(tiny_job, "select", server.url, concurrency=1,
                                                   search={"generations": 1})), progress=False)
    llm = result["cost"]["llm"]
    assert llm["selections_repaired"] == 3 and llm["selections"] == 3
    with ScriptedChat(dim=DIM) as server:
        result = runner.run(spec_mod.parse(llm_job(tiny_job, "tournament", server.url, selection=False)),
                            progress=False)
        kinds = [e["kind"] for e in transcript(llm_job(tiny_job, "tournament", server.url))]
    assert "selection" not in kinds
    assert result["counters"]["tournament_selections"] == 2 * 4
    assert result["cost"]["llm"]["selections"] == 0


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"candidates": [[0.1, 0.2], [0.3, 0.4]]}', [[0.1, 0.2], [0.3, 0.4]]),
        ('{"candidates":[[10,20],[30,40]]}', [[10, 20], [30, 40]]),
        ('Sure! ```json\n{"candidates": [[0.1, 0.2]]}\n```', [[0.1, 0.2]]),
        ("[[0.5, 0.1]]", [[0.5, 0.1]]),
        ("[0.5, 0.1]", [[0.5, 0.1]]),
        ('{"children": [[1, 2]]}', [[1, 2]]),
        ('{"candidates":[{"attention":[1,2],"mlp":[3,4]}]}', [{"attention": [1, 2], "mlp": [3, 4]}]),
        ('{"attention":[1,2],"mlp":[3,4]}', [{"attention": [1, 2], "mlp": [3, 4]}]),
        ('{"candidates": [[0.1, 0.2', None),
        ('{"candidates": [[0.1, 0.2], [0.3, 0.4], [0.5', [[0.1, 0.2], [0.3, 0.4]]),  # salvaged
        ('{"candidates": [[0.1, 0.2]], "perplexity": {"x": [2', [[0.1, 0.2]]),
        ("no json here", None),
        ('{"candidates": "0.3"}', None),
    ],
)
def test_parse_candidates(text, expected):
    assert parse_candidates(text) == expected


def test_edit_operators_write_new_children(tiny_job):
    """llm.operators: edits -- crossovers as a choice of parent per block, mutations as moves."""
    with ScriptedChat(dim=DIM) as server:
        doc = llm_job(tiny_job, "edits", server.url, operators="edits", search={"generations": 3})
        result = runner.run(spec_mod.parse(doc), progress=False)
        bodies = list(server.requests)
    asked_again = [b for b in bodies if b["messages"][-1]["content"].startswith("Candidate ")]  # repeats
    schemas = [b["response_format"]["json_schema"]["schema"] for b in bodies if b not in asked_again]
    takes = [s for s in schemas if "take" in s["properties"]]
    moves = [s for s in schemas if "moves" in s["properties"]]
    assert len(takes) == len(moves) == 3 * 2  # one prompt per pair and per parent in edit mode
    assert takes[0]["properties"]["take"]["pattern"] == "^[AB]{6}$"
    move = moves[0]["properties"]["moves"]["items"]
    assert move["prefixItems"][0] == {"type": "integer", "minimum": 0, "maximum": DIM - 1}
    llm = result["cost"]["llm"]
    assert llm["unparseable_replies"] == llm["offspring_repaired"] == 0
    # a move clipped away entirely is unusable (replaced); everything else the LLM wrote is used or new
    assert llm["offspring_used"] + llm["offspring_replaced"] == llm["offspring_asked"]
    # every prompt with a repeat is asked again once (an initial prompt writes two candidates)
    again = [e for e in transcript(doc) if e["kind"].endswith("-again")]
    assert len(again) <= llm["offspring_duplicates"] and bool(again) == bool(llm["offspring_duplicates"])
    # children written as edits enter the search under the LLM's origins (that a move never gives back its
    # parent is test_moves_keep_the_mean_and_the_bounds; this server's random moves may still hit a
    # candidate seen elsewhere, or be clipped away, which the counts above account for)
    assert result["origins"]["llm-mutation"]["made"] >= 1 and result["origins"]["llm-crossover"]["made"] >= 1


def test_moves_keep_the_mean_and_the_bounds():
    import numpy as np

    from selfpruner.search import operators
    from selfpruner.search.space import SearchSpace

    space = SearchSpace(num_blocks=4, ratio=0.3, max_rate=0.6)
    parent = np.array([30, 30, 30, 30])
    child = operators.apply_moves(space, parent, [(0, 1, 5), (2, 3, 40)])  # the second is clipped at 60
    assert child.tolist() == [25, 35, 0, 60] and space.is_feasible(child)
    assert operators.apply_moves(space, parent, [(1, 1, 5)]) is None  # moves nothing
    child = operators.take(space, np.array([10, 50, 30, 30]), np.array([50, 10, 30, 30]), "AABB")
    assert space.is_feasible(child)
