"""The installation's defaults (the chart's `defaults`, SELFPRUNER_DEFAULTS) as the operator
applies them to a PruneJob's spec. The operator end to end with them: test_operator_e2e.py."""

from __future__ import annotations

import json

import pytest

from selfpruner.cluster import defaults

STORE = {"uri": "s3://platform/runs", "endpointURL": "http://minio:9000", "credentialsSecret": {"name": "s3"}}
LLM = {"baseURL": "http://vllm:8000/v1", "apiKeySecret": {"name": "llm", "key": "token"}}


def test_storage_is_taken_whole_only_when_the_prunejob_has_none():
    spec, used = defaults.apply({"target": {"ratio": 0.3}}, {"storage": STORE})
    assert spec["storage"] == STORE and used == ["storage"]
    own = {"uri": "s3://mine/runs"}
    spec, used = defaults.apply({"storage": own}, {"storage": STORE})
    assert spec["storage"] == own and used == []  # no endpoint of another store slipped in


def test_llm_endpoint_and_key_fill_only_openai_without_an_endpoint_of_its_own():
    spec, used = defaults.apply({"llm": {"provider": "openai", "model": "m"}}, {"llm": LLM})
    assert spec["llm"] == {"provider": "openai", "model": "m", **LLM}
    assert used == ["llm.baseURL", "llm.apiKeySecret"]
    own = {"provider": "openai", "model": "m", "baseURL": "http://own/v1"}
    spec, used = defaults.apply({"llm": own}, {"llm": LLM})
    assert spec["llm"] == own and used == []  # its own endpoint: nothing of the installation's
    spec, used = defaults.apply({"llm": {"provider": "local", "model": "demo"}}, {"llm": LLM})
    assert spec["llm"] == {"provider": "local", "model": "demo"} and used == []


def test_the_installation_key_never_goes_to_an_endpoint_the_prunejob_names():
    # the controller sends the key as a Bearer token to spec.llm.baseURL: a PruneJob naming its
    # own endpoint must not receive the installation's key (it would be sent to that URL)
    for own in ({"baseURL": "https://attacker.example/v1"},
                {"baseURL": "https://attacker.example/v1", "apiKeyEnv": "OPENAI_API_KEY"}):
        spec, used = defaults.apply({"llm": {"provider": "openai", "model": "m", **own}}, {"llm": LLM})
        assert "apiKeySecret" not in spec["llm"] and used == []
    # its own key to the installation's endpoint is its own choice
    mine = {"name": "mine", "key": "k"}
    spec, used = defaults.apply({"llm": {"provider": "openai", "model": "m", "apiKeySecret": mine}}, {"llm": LLM})
    assert spec["llm"]["apiKeySecret"] == mine and spec["llm"]["baseURL"] == LLM["baseURL"]
    assert used == ["llm.baseURL"]
    # an installation key without an installation endpoint is never handed out
    spec, used = defaults.apply({"llm": {"provider": "openai", "model": "m"}},
                                {"llm": {"apiKeySecret": LLM["apiKeySecret"]}})
    assert "apiKeySecret" not in spec["llm"] and used == []


def test_the_prunejob_is_not_changed_in_place():
    original = {"llm": {"provider": "openai", "model": "m"}}
    defaults.apply(original, {"storage": STORE, "llm": LLM})
    assert original == {"llm": {"provider": "openai", "model": "m"}}


def test_load_reads_json_and_refuses_anything_else_in_one_line():
    assert defaults.load({}) == {}
    assert defaults.load({"SELFPRUNER_DEFAULTS": json.dumps({"storage": STORE})}) == {"storage": STORE}
    for bad in ("{storage: x}", "[1]", '{"storage": "s3://x"}'):
        with pytest.raises(SystemExit, match="SELFPRUNER_DEFAULTS.*defaults"):
            defaults.load({"SELFPRUNER_DEFAULTS": bad})
