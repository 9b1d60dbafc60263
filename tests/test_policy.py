"""The installation's security boundary (the chart's `policy`) as the operator checks a
defaulted PruneJob spec against it. End to end through kopf: test_operator_e2e.py."""

from __future__ import annotations

import json

import pytest

from selfpruner.errors import UserError
from selfpruner_operator import policy

PRUNER = "registry.example/selfpruner-pruner:0.1.0"
DEFAULTS = {"storage": {"uri": "s3://runs", "credentialsSecret": {"name": "s3-credentials"}},
            "llm": {"baseURL": "http://vllm/v1", "apiKeySecret": {"name": "llm-key", "key": "token"}}}


def spec(**sections):
    return {"storage": {"uri": "s3://runs"}, **sections}


def refused(s, pol, message):
    with pytest.raises(UserError) as e:
        policy.check(s, pol, DEFAULTS, PRUNER)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_installation_secrets_and_listed_ones_are_allowed_others_refused():
    policy.check(spec(storage={"uri": "s3://x", "credentialsSecret": {"name": "s3-credentials"}}), {}, DEFAULTS, PRUNER)
    policy.check(spec(llm={"apiKeySecret": {"name": "llm-key", "key": "k"}}), {}, DEFAULTS, PRUNER)
    mine = spec(storage={"uri": "s3://x", "credentialsSecret": {"name": "team-s3"}})
    refused(mine, {}, "spec.storage.credentialsSecret: Secret 'team-s3' is not one this installation hands")
    policy.check(mine, {"allowedSecrets": ["team-s3"]}, DEFAULTS, PRUNER)
    refused(spec(llm={"apiKeySecret": {"name": "db", "key": "password"}}), {"allowedSecrets": ["team-s3"]},
            "spec.llm.apiKeySecret: Secret 'db'")


def test_images_only_the_pruner_or_an_allowed_registry():
    policy.check(spec(evaluator={"image": PRUNER}), {}, DEFAULTS, PRUNER)
    policy.check(spec(evaluator={}), {}, DEFAULTS, PRUNER)
    refused(spec(evaluator={"image": "docker.io/x/y:1"}), {}, "none allowed")
    allowed = {"allowedImagePrefixes": ["registry.example/ml/"]}
    policy.check(spec(evaluator={"image": "registry.example/ml/pruner-cuda:2"}), allowed, DEFAULTS, PRUNER)
    # a prefix is a prefix of the whole reference: another registry whose name starts alike is refused
    refused(spec(evaluator={"image": "registry.example/mlx/evil:1"}), allowed, "registry.example/ml/")


def test_a_hostpath_node_cache_only_when_enabled_and_only_its_path():
    refused(spec(evaluator={"nodeCache": "/var/cache/selfpruner"}), {}, "does not allow hostPath node caches")
    on = {"nodeCache": {"enabled": True, "path": "/mnt/models"}}
    policy.check(spec(evaluator={"nodeCache": "/mnt/models"}), on, DEFAULTS, PRUNER)
    refused(spec(evaluator={"nodeCache": "/"}), on, "only /mnt/models is allowed")


def test_every_problem_in_one_line():
    s = spec(storage={"uri": "s3://x", "credentialsSecret": {"name": "a"}}, evaluator={"image": "b", "nodeCache": "/c"})
    with pytest.raises(UserError) as e:
        policy.check(s, {}, DEFAULTS, PRUNER)
    assert str(e.value).count("; ") >= 2 and "\n" not in str(e.value)


def test_load_reads_json_and_refuses_anything_else():
    assert policy.load({}) == {}
    assert policy.load({"SELFPRUNER_POLICY": json.dumps({"allowedSecrets": ["a"]})}) == {"allowedSecrets": ["a"]}
    for bad in ("{x", "[1]"):
        with pytest.raises(SystemExit, match="SELFPRUNER_POLICY"):
            policy.load({"SELFPRUNER_POLICY": bad})
