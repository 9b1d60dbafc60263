"""llm-evolution against a real local HTTP server speaking the chat-completions protocol,
with scripted misbehaviour; parsing of replies; the transcript."""

import json

import pytest

from chat_server import ScriptedChat, good_candidates
from selfpruner import spec as spec_mod
from selfpruner.search import runner
from selfpruner.search.llm_evolution import parse_candidates

DIM = 6


def llm_job(tiny_job, name, url, **extra):
    return tiny_job(name, search={"strategy": "llm-evolution"},
                    llm={"provider": "openai", "model": "scripted", "baseURL": url, "timeoutSeconds": 0.5,
                         "maxRetries": 2, "offspringPerCall": 2, **extra})


def test_search_survives_a_misbehaving_server(tiny_job):
    script = [
        ("status", 429), ("reply", good_candidates("a", 2, DIM)),  # 429 then 200: the SDK retries
        ("reply", json.dumps({"candidates": [[0.3] * 4, [0.9, 0.9, 0.0, 0.0, 0.0, 0.0]]})),  # wrong length, out of range
        ("status", 500), ("status", 500), ("status", 500),  # out of retries: the call fails
        ("reply", "I think block 3 matters most."),  # garbage
        ("reply", '{"candidates": [[0.1, 0.2, 0.3'),  # truncated JSON
        ("sleep", 2.0, "{}"), ("sleep", 2.0, "{}"), ("sleep", 2.0, "{}"),  # timeouts
    ]
    with ScriptedChat(script, dim=DIM) as server:
        doc = llm_job(tiny_job, "misbehaving", server.url)
        result = runner.run(spec_mod.parse(doc), progress=False)
        sent = len(server.requests)
    counters = result["counters"]
    llm = result["cost"]["llm"]
    assert llm["calls"] == 2 + 2 * 2  # initial population in 2 calls, then 2 calls a generation
    assert sent == llm["calls"] + 1 + 2 + 2  # one retry after the 429, two after 500s, two after timeouts
    assert llm["failed_calls"] == 2 == counters["llm_failed_calls"]
    assert counters["llm_unparseable_replies"] == 2
    assert counters["llm_repaired"] >= 1 and counters["llm_replaced"] >= 1 + 2 * 2
    assert counters["llm_as_written"] >= 2
    assert llm["offspring_asked"] == 4 + 2 * 4
    assert 0 < llm["as_written_share"] < 1
    assert result["best"]["fitness"] > 0
    transcript = [json.loads(line) for line in open(doc["spec"]["output"]["path"] + "/llm_transcript.jsonl")]
    assert len(transcript) == llm["calls"]
    assert sum(1 for e in transcript if e["error"]) == 2
    assert all(e["messages"][0]["role"] == "system" for e in transcript)


def test_json_mode_is_dropped_when_the_server_refuses_it(tiny_job):
    with ScriptedChat([("status", 400)], dim=DIM) as server:
        result = runner.run(spec_mod.parse(llm_job(tiny_job, "nojson", server.url)), progress=False)
        first, second = server.requests[0], server.requests[1]
    assert "response_format" in first and "response_format" not in second
    assert result["cost"]["llm"]["failed_calls"] == 0


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"candidates": [[0.1, 0.2], [0.3, 0.4]]}', [[0.1, 0.2], [0.3, 0.4]]),
        ('Sure! ```json\n{"candidates": [[0.1, 0.2]]}\n```', [[0.1, 0.2]]),
        ("[[0.5, 0.1]]", [[0.5, 0.1]]),
        ("[0.5, 0.1]", [[0.5, 0.1]]),
        ('{"children": [[1, 2]]}', [[1, 2]]),
        ('{"candidates": [[0.1, 0.2', None),
        ('{"candidates": [[0.1, 0.2], [0.3, 0.4], [0.5', [[0.1, 0.2], [0.3, 0.4]]),  # salvaged
        ('{"candidates": [[0.1, 0.2]], "perplexity": {"x": [2', [[0.1, 0.2]]),
        ("no json here", None),
        ('{"candidates": "0.3"}', None),
    ],
)
def test_parse_candidates(text, expected):
    assert parse_candidates(text) == expected
