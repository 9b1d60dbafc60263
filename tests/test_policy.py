"""The installation's security boundary (the chart's `policy`) as the operator checks a
defaulted PruneJob spec against it. End to end through kopf: test_operator_e2e.py."""

from __future__ import annotations

import json

import pytest

from selfpruner.errors import UserError
from selfpruner.cluster import policy

PRUNER = "registry.example/selfpruner-pruner:0.1.0"
DEFAULTS = {"storage": {"uri": "s3://runs", "credentialsSecret": {"name": "s3-credentials"}},
            "llm": {"baseURL": "http://vllm/v1", "apiKeySecret": {"name": "llm-key", "key": "token"}}}


TEXTS = {"calibration": {"text": "s3://texts/calibration.txt"},
         "fitness": {"text": "s3://texts/fitness.txt", "heldOutText": "s3://texts/heldout.txt"}}


def spec(**sections):
    """A spec with texts of its own and a search without an LLM (test_policy_cluster_inputs.py: what
    a PruneJob that omits them gets on a cluster)."""
    return {"storage": {"uri": "s3://runs"}, **TEXTS, "search": {"strategy": "genetic"}, **sections}


def refused(s, pol, message):
    with pytest.raises(UserError) as e:
        policy.check(s, pol, DEFAULTS, PRUNER)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_installation_secrets_go_with_its_endpoints_and_listed_ones_anywhere():
    policy.check(spec(storage={"uri": "s3://runs/team-a", "credentialsSecret": {"name": "s3-credentials"}}),
                 {}, DEFAULTS, PRUNER)
    policy.check(spec(llm={"baseURL": "http://vllm/v1", "apiKeySecret": {"name": "llm-key", "key": "k"}}),
                 {}, DEFAULTS, PRUNER)
    mine = spec(storage={"uri": "s3://x", "credentialsSecret": {"name": "team-s3"}})
    refused(mine, {}, "spec.storage.credentialsSecret: Secret 'team-s3' is not one this installation hands")
    policy.check(mine, {"allowedSecrets": ["team-s3"]}, DEFAULTS, PRUNER)
    refused(spec(llm={"apiKeySecret": {"name": "db", "key": "password"}}), {"allowedSecrets": ["team-s3"]},
            "spec.llm.apiKeySecret: Secret 'db'")


def test_tenant_a_tries_to_send_the_installation_llm_key_to_its_own_endpoint():
    attack = spec(llm={"provider": "openai", "model": "m", "baseURL": "https://attacker.example/v1",
                       "apiKeySecret": {"name": "llm-key", "key": "token"}})
    refused(attack, {}, "the installation's LLM key 'llm-key' goes only to its own endpoint (http://vllm/v1)")
    # the same key named under the storage field is no way round it
    refused(spec(storage={"uri": "s3://runs/a", "endpointURL": "https://attacker.example",
                          "credentialsSecret": {"name": "llm-key"}}), {}, "Secret 'llm-key' is not one")


def test_tenant_a_tries_to_send_the_installation_storage_credentials_elsewhere():
    to_endpoint = spec(storage={"uri": "s3://runs/a", "endpointURL": "https://attacker.example",
                                "credentialsSecret": {"name": "s3-credentials"}})
    refused(to_endpoint, {}, "go only to its own storage endpoint")
    # another bucket on the same endpoint, or a bucket whose name merely starts alike
    for uri in ("s3://private-of-b/llama", "s3://runs-evil/a"):
        refused(spec(storage={"uri": uri, "credentialsSecret": {"name": "s3-credentials"}}), {},
                "go only with storage under s3://runs")
    # nor as the LLM key, to an endpoint of its choosing
    refused(spec(llm={"baseURL": "https://attacker.example/v1", "apiKeySecret": {"name": "s3-credentials",
                                                                                  "key": "AWS_SECRET_ACCESS_KEY"}}),
            {}, "Secret 's3-credentials' is not one")


def test_tenant_a_tries_scheduling_knobs_that_reach_other_tenants():
    refused(spec(evaluator={"priorityClassName": "system-node-critical"}), {},
            "priorityClassName: 'system-node-critical' is not allowed")
    policy.check(spec(evaluator={"priorityClassName": "batch-low"}), {"allowedPriorityClasses": ["batch-low"]},
                 DEFAULTS, PRUNER)
    gpu = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    refused(spec(evaluator={"tolerations": [gpu]}), {}, "tolerating taint key 'nvidia.com/gpu' is not allowed")
    policy.check(spec(evaluator={"tolerations": [gpu]}), {"allowedTolerationKeys": ["nvidia.com/gpu"]},
                 DEFAULTS, PRUNER)
    refused(spec(evaluator={"tolerations": [{"operator": "Exists"}]}), {"allowedTolerationKeys": ["nvidia.com/gpu"]},
            "tolerating every taint")
    refused(spec(evaluator={"affinity": {"nodeAffinity": {}}}), {}, "affinity: not allowed")
    refused(spec(evaluator={"nodeSelector": {"kubernetes.io/hostname": "node-of-b"}}),
            {"allowedNodeSelectorKeys": ["nvidia.com/gpu.product"]}, "key 'kubernetes.io/hostname' is not allowed")


def test_every_child_is_checked_as_it_is_created():
    """check_job sees the Job itself: what a spec edited after admission, or a bug, would put in a pod."""
    from selfpruner.cluster import manifests

    pj = {"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob",
          "metadata": {"name": "a", "namespace": "team-a", "uid": "11111111-2222-3333-4444-555555555555"},
          "spec": {"model": {"source": "s3://runs/m"}, "target": {"ratio": 0.3}, **TEXTS,
                   "storage": {"uri": "s3://runs/a", "credentialsSecret": {"name": "s3-credentials"}},
                   "llm": {"provider": "openai", "model": "m", "baseURL": "http://vllm/v1",
                           "apiKeySecret": {"name": "llm-key", "key": "token"}, "apiKeyEnv": "AWS_ENDPOINT_URL_S3"}}}
    controller = manifests.controller_job(pj, image=PRUNER, service_account="sa")
    policy.check_job(controller, pj["spec"], {}, DEFAULTS, PRUNER)
    env = {e["name"] for e in controller["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert policy.LLM_KEY_ENV in env and "AWS_ENDPOINT_URL_S3" not in env, "the PruneJob chose a variable name"
    evaluation = manifests.evaluation_job(pj, generation=0, shards=2, image=PRUNER, batch="abc")
    policy.check_job(evaluation, pj["spec"], {}, DEFAULTS, PRUNER)
    tampered = manifests.evaluation_job(pj, generation=0, shards=2, image=PRUNER, batch="abc")
    pod = tampered["spec"]["template"]["spec"]
    pod["containers"][0]["image"] = "docker.io/evil/x:1"
    pod["containers"][0]["env"].append({"name": "LD_PRELOAD", "value": "/tmp/x.so"})
    pod["containers"][0]["envFrom"] = [{"secretRef": {"name": "db-password"}}]
    pod["volumes"].append({"name": "root", "hostPath": {"path": "/"}})
    pod["priorityClassName"] = "system-node-critical"
    with pytest.raises(UserError) as e:
        policy.check_job(tampered, pj["spec"], {}, DEFAULTS, PRUNER)
    message = str(e.value)
    for what in ("docker.io/evil/x:1", "'LD_PRELOAD'", "'db-password'", "hostPath /", "system-node-critical"):
        assert what in message, what
    assert "\n" not in message


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
