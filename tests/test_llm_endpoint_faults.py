"""An LLM endpoint that fails: which 400s give up the structured response format, and a dead
endpoint (nothing listening, a refused key, an unknown model) ending the run with one line
instead of quietly turning llm-evolution into a classical search. Against a real HTTP server
(`chat_server.py`) and, for what a user sees, a real `selfpruner run` process."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from ports import free_port
from chat_server import ScriptedChat
from selfpruner import spec as spec_mod
from selfpruner.search import runner
from selfpruner.errors import LLMUnavailable
from selfpruner.search.llm_clients import OpenAIChat, Prompt

DIM = 6
KEY = "sk-secret-value"
SCHEMA = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}

# what servers answer when the prompt is too long or a parameter unknown: nothing about the format
NOT_ABOUT_THE_FORMAT = [
    # vLLM (its own error shape, no `param`)
    {"object": "error", "message": "This model's maximum context length is 2048 tokens. However, you requested "
                                   "3000 tokens (2000 in the messages, 1000 in the completion). Please reduce the "
                                   "length of the messages or completion.", "type": "BadRequestError",
     "param": None, "code": 400},
    # OpenAI
    {"error": {"message": "This model's maximum context length is 8192 tokens. However, your messages resulted "
                          "in 9000 tokens. Please reduce the length of the messages.",
               "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}},
    {"error": {"message": "Unrecognized request argument supplied: seed", "type": "invalid_request_error",
               "param": None, "code": None}},
    # SGLang
    {"object": "error", "message": "The input (3000 tokens) is longer than the model's context length (2048 "
                                   "tokens).", "type": "BadRequestError", "param": None, "code": 400},
]

# what servers answer when they do not take json_schema (or this schema)
ABOUT_THE_FORMAT = [
    {"error": {"message": "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this "
                          "model.", "type": "invalid_request_error", "param": "response_format", "code": None}},
    {"error": {"code": "InvalidParameter", "message": "The parameter `response_format.type` specified in the "
               "request are not valid: invalid value: `json_schema`, supported values are: `json_object` and "
               "`text`.", "param": "response_format.type", "type": "BadRequest"}},
    {"object": "error", "message": "The provided JSON schema contains features not supported by xgrammar.",
     "type": "BadRequestError", "param": None, "code": 400},
    {"error": {"code": 400, "message": "JSON schema conversion failed:\nUnrecognized schema: \"object\"",
               "type": "invalid_request_error"}},
    {"object": "error", "message": "Grammar-based generation (json_schema, regex, ebnf, structural_tag) is not "
                                   "supported when the server is launched with --grammar-backend none",
     "type": "BadRequestError", "param": None, "code": 400},
]


REPLIES = [("reply", json.dumps({"x": i})) for i in range(3)]


def ask(server, n=3):
    """`n` calls, one at a time, to an OpenAIChat on `server`: the client, the outcomes and the
    response formats sent."""
    client = OpenAIChat("m", base_url=server.url, max_retries=0, timeout=5, concurrency=1)
    outcomes = client.chat_many([Prompt([{"role": "user", "content": f"call {i}"}], SCHEMA) for i in range(n)])
    return client, outcomes, [(b.get("response_format") or {}).get("type", "text") for b in server.requests]


@pytest.mark.parametrize("body", NOT_ABOUT_THE_FORMAT)
def test_a_400_not_about_the_format_fails_the_call_and_keeps_the_schema(body):
    with ScriptedChat([("status", 400, body)] + REPLIES, dim=DIM) as server:
        client, outcomes, sent = ask(server)
    assert sent == ["json_schema"] * 3  # the next calls still ask for the schema
    assert client.refused == [] and client.format == "json_schema"
    assert outcomes[0].reply is None and "HTTP 400" in outcomes[0].error
    assert all(o.reply is not None for o in outcomes[1:])


@pytest.mark.parametrize("body", ABOUT_THE_FORMAT)
def test_a_400_about_the_format_steps_down_for_good(body):
    with ScriptedChat([("status", 400, body)] + REPLIES, dim=DIM) as server:
        client, outcomes, sent = ask(server)
    assert sent == ["json_schema", "json_object", "json_object", "json_object"]
    assert client.refused == ["json_schema"]
    assert all(o.reply is not None for o in outcomes)


def test_a_context_length_400_mid_run_leaves_json_schema_in_use(tiny_job):
    """One prompt too long for the model, in a whole search: that call fails and is replaced;
    every other call still carries the strict schema."""
    with ScriptedChat([("status", 400, NOT_ABOUT_THE_FORMAT[0])], dim=DIM) as server:
        doc = llm_job(tiny_job, "context", server.url, concurrency=1)
        result = runner.run(spec_mod.parse(doc), progress=False)
        sent = [(b.get("response_format") or {}).get("type") for b in server.requests]
    llm = result["cost"]["llm"]
    assert set(sent) == {"json_schema"}
    assert llm["refused_response_formats"] == [] and llm["failed_calls"] == 1


def llm_job(tiny_job, name, url, **llm):
    # population 6 = uniform + owl + 2 random draws + 2 from the LLM: the initial round is two calls,
    # so one scripted failure in it sits next to an answer (one failed call alone is a dead endpoint)
    return tiny_job(name, search={"strategy": "llm-evolution", "population": 6},
                    llm={"provider": "openai", "model": "m", "baseURL": url, "maxRetries": 0, "timeoutSeconds": 2,
                         **llm})


def selfpruner_run(tiny_job, tmp_path, name, url, **llm):
    """`selfpruner run` as a user runs it, with a key in the environment."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(llm_job(tiny_job, name, url, **llm)))
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    return subprocess.run([sys.executable, "-m", "selfpruner.cli", "run", str(path), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)


def assert_one_line_naming(done, url, fragment):
    """Exit code 2 and one error line, the last on stderr (the lines before it are the memory
    plan, printed before the search starts); no traceback; no key."""
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("selfpruner: error: ")]
    assert errors == lines[-1:] and "Traceback" not in done.stderr, done.stderr
    line = errors[0]
    assert url in line and "model m" in line and fragment in line, line
    assert KEY not in done.stdout + done.stderr



def test_a_dead_endpoint_ends_the_run_with_one_line(tiny_job, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    done = selfpruner_run(tiny_job, tmp_path, "dead", url)
    assert_one_line_naming(done, url, "Connection refused")
    assert not (tmp_path / "runs" / "dead" / "result.json").exists()


def test_a_refused_key_ends_the_run_at_once(tiny_job, tmp_path):
    """The server echoes the key it refused (as OpenAI does, masked): it stays out of the output."""
    with ScriptedChat(dim=DIM, fail=(401, "Incorrect API key provided: {key}.")) as server:
        done = selfpruner_run(tiny_job, tmp_path, "refused", server.url, concurrency=1)
        asked = len(server.requests)
    assert_one_line_naming(done, server.url, "HTTP 401: Incorrect API key provided")
    assert asked == 1  # the first such answer ends it: no further call is made


@pytest.mark.parametrize("status, message", [(401, "Invalid authentication"), (403, "Forbidden"),
                                             (404, "The model `m` does not exist.")])
def test_a_refused_key_or_unknown_model_is_fatal_on_the_first_answer(status, message):
    with ScriptedChat(dim=DIM, fail=(status, message)) as server:
        with pytest.raises(LLMUnavailable, match=f"HTTP {status}: {message}") as caught:
            ask(server)
        asked = len(server.requests)
    assert asked == 1 and server.url in str(caught.value) and "model m" in str(caught.value)


def test_an_endpoint_failing_some_calls_still_completes_the_run(tiny_job):
    """Failures next to successes are occasional: counted, replaced by classical operators."""
    with ScriptedChat([("status", 500)], dim=DIM) as server:  # the first initial call fails, the rest are answered
        doc = llm_job(tiny_job, "some", server.url, concurrency=1, offspringPerCall=1)
        result = runner.run(spec_mod.parse(doc), progress=False)
    llm = result["cost"]["llm"]
    assert llm["failed_calls"] == 1 and llm["calls"] > 1
    assert result["origins"]["classical"]["made"] >= 1 and result["best"]["fitness"] > 0
    assert sum(1 for e in transcript(doc) if e["error"]) == 1


def test_an_endpoint_gone_mid_run_ends_it_on_the_second_failed_round(tiny_job):
    """One failed round after answers (a selection out of retries) is occasional; a second right
    after it means the endpoint has gone away."""
    initial = [("default",)] * 2  # the LLM's 2 of population 6, one per call: answered
    with ScriptedChat(initial, dim=DIM, fail=(503, "the server is shutting down")) as server:
        doc = llm_job(tiny_job, "gone", server.url, concurrency=1, offspringPerCall=1)
        with pytest.raises(LLMUnavailable, match="HTTP 503: the server is shutting down"):
            runner.run(spec_mod.parse(doc), progress=False)
        asked = len(server.requests)
    entries = transcript(doc)
    assert [bool(e["error"]) for e in entries[:2]] == [False, False]  # the initial round, answered
    failed = entries[2:]
    assert failed and all(e["error"] for e in failed) and len({e["batch"] for e in failed}) == 1  # let pass
    assert asked > len(entries)  # the round after it failed too: the run ended, and that round is not kept


def test_a_recorded_failure_is_replayed_as_a_failure(tiny_job):
    """A resumed search replays the transcript's failures as failures: neither asked again nor fatal."""
    with ScriptedChat([("status", 500)], dim=DIM) as server:
        doc = llm_job(tiny_job, "replay", server.url, concurrency=1, offspringPerCall=1)
        runner.run(spec_mod.parse(doc), progress=False, stop_after_generation=1)
    recorded = transcript(doc)
    assert recorded[0]["error"] and not recorded[1]["error"]
    os.remove(doc["spec"]["output"]["path"] + "/state.json")  # resume from call 0: every recorded call replayed
    with ScriptedChat(dim=DIM) as server:
        doc = llm_job(tiny_job, "replay", server.url, concurrency=1, offspringPerCall=1)
        result = runner.run(spec_mod.parse(doc), progress=False)
        asked = [b["messages"][-1]["content"] for b in server.requests]
    assert not {e["messages"][-1]["content"] for e in recorded} & set(asked)
    assert result["cost"]["llm"]["failed_calls"] == 1


def transcript(doc):
    return [json.loads(line) for line in open(doc["spec"]["output"]["path"] + "/llm_transcript.jsonl")]
