"""The emulated API server (tests/k8s/) is as strict as kube-apiserver for what this project
uses: each test shows it pruning or refusing what a real server prunes or refuses. A test double
that accepts more than the real thing lets a broken product pass."""

from __future__ import annotations

import json
import textwrap
import threading
import urllib.error
import urllib.request

import pytest
import yaml

from k8s import Cluster, ClusterApiError, find_kubectl

PJ = "/apis/selfpruner.io/v1alpha1/namespaces/default/prunejobs"
WIDGETS = "/apis/example.com/v1/namespaces/default/widgets"
JOBS = "/apis/batch/v1/namespaces/default/jobs"

WIDGET_CRD = yaml.safe_load(textwrap.dedent("""\
    apiVersion: apiextensions.k8s.io/v1
    kind: CustomResourceDefinition
    metadata: {name: widgets.example.com}
    spec:
      group: example.com
      scope: Namespaced
      names: {kind: Widget, listKind: WidgetList, plural: widgets, singular: widget}
      versions:
        - name: v1
          served: true
          storage: true
          subresources: {status: {}}
          schema:
            openAPIV3Schema:
              type: object
              properties:
                spec:
                  type: object
                  x-kubernetes-validations:
                    - {rule: "!has(self.limit) || self.size <= self.limit", message: "size must not exceed limit"}
                    - {rule: "!oldSelf.frozen || self.size == oldSelf.size", message: "a frozen widget keeps its size"}
                  properties:
                    size: {type: integer, default: 1}
                    limit: {type: integer}
                    frozen: {type: boolean, default: false}
                    free:
                      type: object
                      x-kubernetes-preserve-unknown-fields: true
                      properties:
                        known: {type: object, properties: {a: {type: string}}}
                    tags: {type: object, additionalProperties: {type: object, properties: {v: {type: string}}}}
                    parts:
                      type: array
                      items: {type: object, properties: {name: {type: string}, weight: {type: integer, default: 1}}}
                    quantity: {x-kubernetes-int-or-string: true}
                    note: {type: string, nullable: true}
                    bounds:
                      type: object
                      properties: {low: {type: integer}}
                      x-kubernetes-validations: [{rule: "self.low >= 0", message: "low must not be negative"}]
                status:
                  type: object
                  properties:
                    phase: {type: string, enum: [Ready, Broken]}
                    count: {type: integer, default: 0}
    """))


@pytest.fixture()
def cluster(tmp_path):
    with Cluster(tmp_path / "cluster") as cluster:
        cluster.create(WIDGET_CRD)
        yield cluster
        assert not cluster.emulator.server_errors, cluster.emulator.server_errors[-1]


def call(cluster, method, path, body=None, params=None, ctype="application/json"):
    """(code, headers, body) of one request, errors included."""
    url = cluster.url + path + ("?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read() or b"null")


def prunejob(name="demo", **spec):
    return {"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob", "metadata": {"name": name},
            "spec": {"model": {"source": "demo"}, "target": {"ratio": 0.2}, **spec}}


def widget(name="w", **spec):
    return {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec}


def job(name, **spec):
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {**spec, "template": {"spec": {"restartPolicy": "Never", "containers": [
                {"name": "main", "image": "busybox", "command": ["true"]}]}}}}


def test_undeclared_fields_are_pruned_on_create_put_every_patch_and_status(cluster):
    created = cluster.create(prunejob(bogus=1, target={"ratio": 0.2, "extra": True}))
    assert "bogus" not in created["spec"] and "extra" not in created["spec"]["target"]
    # an undeclared status field (status.controllerJob was one, before the CRD declared it): dropped
    st = cluster.patch("prunejobs", "demo", {"status": {"phase": "Running", "notDeclared": "x"}},
                       subresource="status")
    assert st["status"] == {"phase": "Running"}
    for ctype, patch in (("application/merge-patch+json", {"spec": {"x1": 1}}),
                         ("application/json-patch+json", [{"op": "add", "path": "/spec/x3", "value": 1}])):
        assert not {"x1", "x3"} & set(cluster.patch("prunejobs", "demo", patch, content_type=ctype)["spec"])
    current = cluster.get("prunejobs", "demo")
    current["spec"]["x4"] = 1
    code, _, put = call(cluster, "PUT", f"{PJ}/demo", current)
    assert code == 200 and "x4" not in put["spec"]


def test_preserve_unknown_fields_maps_items_and_int_or_string_keep_what_they_declare(cluster):
    w = cluster.create(widget(free={"anything": {"deep": 1}, "known": {"a": "x", "b": 2}},
                              tags={"t1": {"v": "1", "junk": 1}}, parts=[{"name": "p", "junk": 1}],
                              quantity="10Gi"))
    spec = w["spec"]
    assert spec["free"] == {"anything": {"deep": 1}, "known": {"a": "x"}}   # known properties still prune
    assert spec["tags"] == {"t1": {"v": "1"}} and spec["parts"] == [{"name": "p", "weight": 1}]
    assert spec["quantity"] == "10Gi"
    assert cluster.patch("widgets", "w", {"spec": {"quantity": 4}})["spec"]["quantity"] == 4


def test_metadata_keeps_object_meta_and_drops_unknown_fields(cluster):
    body = prunejob()
    body["metadata"].update(labels={"a": "b"}, annotations={"k": "v"}, finalizers=["example.com/f"], junk=1)
    meta = cluster.create(body)["metadata"]
    assert "junk" not in meta and meta["labels"] == {"a": "b"} and meta["finalizers"] == ["example.com/f"]
    assert {"uid", "resourceVersion", "generation", "creationTimestamp", "annotations"} <= set(meta)


def test_field_validation_warn_is_the_default_and_sends_warnings(cluster):
    code, headers, _ = call(cluster, "POST", PJ, prunejob(bogus=1))
    assert code == 201 and headers.get_all("Warning") == ['299 - "unknown field \\"spec.bogus\\""']
    code, headers, _ = call(cluster, "PATCH", f"{PJ}/demo/status", {"status": {"notDeclared": "j"}},
                            ctype="application/merge-patch+json")
    assert code == 200 and headers.get_all("Warning") == ['299 - "unknown field \\"status.notDeclared\\""']


def test_field_validation_strict_refuses_unknown_fields(cluster):
    code, _, status = call(cluster, "POST", PJ, prunejob(bogus=1, more=2), params={"fieldValidation": "Strict"})
    assert code == 400 and status["reason"] == "BadRequest"
    assert status["message"] == ('PruneJob in version "v1alpha1" cannot be handled as a PruneJob: strict decoding '
                                 'error: unknown field "spec.bogus", unknown field "spec.more"')
    assert cluster.get("prunejobs", "demo") is None
    cluster.create(prunejob())
    code, _, status = call(cluster, "PATCH", f"{PJ}/demo", {"spec": {"bogus": 1}}, {"fieldValidation": "Strict"},
                           "application/merge-patch+json")
    assert code == 400 and status["message"] == 'strict decoding error: unknown field "spec.bogus"'


@pytest.mark.skipif(find_kubectl() is None, reason="no kubectl")
def test_kubectl_validate_false_sends_ignore_and_unknown_fields_are_dropped_silently(cluster, tmp_path):
    (tmp_path / "pj.yaml").write_text(yaml.safe_dump(prunejob(bogus=1)))
    proc = cluster.kubectl("apply", "-f", str(tmp_path / "pj.yaml"))      # adds --validate=false
    assert "Warning" not in proc.stderr and "bogus" not in cluster.get("prunejobs", "demo")["spec"]
    posts = [str(r.url) for r in cluster.emulator._requests
             if str(r.method.value) == "POST" and "prunejobs" in str(r.url)]
    assert "fieldValidation=Ignore" in posts[-1]


def test_defaults_apply_on_every_write_not_only_create(cluster):
    cluster.create(widget(parts=[{"name": "a"}]))
    patched = cluster.patch("widgets", "w", [{"op": "remove", "path": "/spec/size"},
                                             {"op": "add", "path": "/spec/parts/-", "value": {"name": "b"}}],
                            content_type="application/json-patch+json")
    assert patched["spec"]["size"] == 1 and [p["weight"] for p in patched["spec"]["parts"]] == [1, 1]
    assert cluster.patch("widgets", "w", {"status": {"phase": "Ready"}}, subresource="status")["status"] == \
        {"phase": "Ready", "count": 0}
    assert cluster.patch("widgets", "w", {"spec": {"note": None, "size": None}})["spec"]["size"] == 1


def test_a_changed_crd_prunes_and_defaults_stored_objects(cluster):
    cluster.create(widget(limit=5))
    crd = cluster.get("customresourcedefinitions", "widgets.example.com")
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    props["color"] = {"type": "string", "default": "blue"}
    del props["limit"]
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"] = []
    code, _, _ = call(cluster, "PUT", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com",
                      crd)
    assert code == 200
    spec = cluster.get("widgets", "w")["spec"]
    assert spec["color"] == "blue" and "limit" not in spec


def test_openapi_validation_refuses_bad_values_one_cause_each(cluster):
    bad = prunejob(target={"ratio": 2}, model={"source": "", "dtype": "int4"}, storage={"uri": "http://x"},
                   calibration={"windows": 1.5})
    with pytest.raises(ClusterApiError) as err:
        cluster.create(bad)
    status = err.value.status
    assert err.value.code == 422 and status["reason"] == "Invalid"
    causes = {c["field"]: c for c in status["details"]["causes"]}
    assert causes["spec.target.ratio"]["message"] == \
        "Invalid value: 2: spec.target.ratio in body should be less than 1"
    assert causes["spec.model.dtype"]["message"] == \
        'Unsupported value: "int4": supported values: "float32", "bfloat16", "float16"'
    assert causes["spec.model.source"]["message"] == \
        'Invalid value: "": spec.model.source in body should be at least 1 chars long'
    assert causes["spec.storage.uri"]["message"].endswith("spec.storage.uri in body should match '^(s3|file)://.+'")
    assert causes["spec.calibration.windows"]["reason"] == "FieldValueTypeInvalid"
    assert status["message"].startswith('PruneJob.selfpruner.io "demo" is invalid: [')
    assert "spec.target.ratio: Invalid value: 2: spec.target.ratio in body should be less than 1" in status["message"]
    with pytest.raises(ClusterApiError) as err:
        cluster.create({**prunejob("nospec"), "spec": None})
    assert "spec: Required value" in err.value.status["message"]


def test_stages_max_items_and_int_or_string_and_nullable(cluster):
    with pytest.raises(ClusterApiError) as err:
        cluster.create(prunejob(fitness={"stages": [{"tokens": 2, "survivors": 1}] * 9}))
    assert "spec.fitness.stages: Too many: 9: must have at most 8 items" in err.value.status["message"]
    with pytest.raises(ClusterApiError) as err:
        cluster.create(widget(quantity=True))
    assert 'spec.quantity in body must be of type integer,string: "boolean"' in err.value.status["message"]
    assert cluster.create(widget("n", note=None))["spec"]["note"] is None     # nullable keeps its null


def test_a_set_list_with_a_repeat_and_a_map_list_with_a_repeated_key_are_refused(cluster):
    """listType set/map: the API server answers each repeat with a Duplicate value, whatever CEL says."""
    with pytest.raises(ClusterApiError) as err:
        cluster.create(prunejob(fitness={"heldOutTexts": ["s3://t/a.txt", "s3://t/b.txt", "s3://t/a.txt"]}))
    causes = {c["field"]: c for c in err.value.status["details"]["causes"]}
    assert causes["spec.fitness.heldOutTexts[2]"] == {"reason": "FieldValueDuplicate", "field":
                                                      "spec.fitness.heldOutTexts[2]",
                                                      "message": 'Duplicate value: "s3://t/a.txt"'}
    assert "spec.fitness.heldOutTexts[1]" not in causes
    assert cluster.create(prunejob("fine", fitness={"heldOutTexts": ["s3://t/a.txt", "s3://t/b.txt"]}))
    condition = {"type": "Running", "status": "True", "reason": "SearchRunning", "message": "m",
                 "lastTransitionTime": "2026-01-01T00:00:00Z"}
    with pytest.raises(ClusterApiError) as err:
        cluster.patch("prunejobs", "fine", {"status": {"conditions": [condition, {**condition, "status": "False"}]}},
                      "default", subresource="status")
    assert 'status.conditions[1]: Duplicate value: {"type":"Running"}' in err.value.status["message"]


def test_a_strategic_merge_patch_of_a_custom_resource_is_refused(cluster):
    """A custom resource has no patch strategies, so kube-apiserver answers 415 to a strategic merge
    patch (what a client sends when it patches with a dict and no content type of its own)."""
    cluster.create(prunejob())
    for sub in (None, "status"):
        with pytest.raises(ClusterApiError) as err:
            cluster.patch("prunejobs", "demo", {"status": {"phase": "Running"}} if sub else {"spec": {"x": 1}},
                          subresource=sub, content_type="application/strategic-merge-patch+json")
        assert err.value.code == 415 and err.value.status["reason"] == "UnsupportedMediaType"
    # built-in kinds have them
    cluster.create(job("sm", suspend=True))
    patched = cluster.patch("jobs", "sm", {"spec": {"suspend": False}},
                            content_type="application/strategic-merge-patch+json")
    assert patched["spec"]["suspend"] is False


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity"])
def test_a_body_with_nan_or_infinity_is_refused(cluster, text):
    """Go's JSON has no NaN or Infinity, Python's json.dumps writes them: a client that puts a NaN
    fitness into a status gets a 400 from a real server, and so here."""
    cluster.create(prunejob())
    raw = ('{"status": {"phase": "Running", "bestFitness": %s}}' % text).encode()
    req = urllib.request.Request(f"{cluster.url}{PJ}/demo/status", data=raw, method="PATCH",
                                 headers={"Content-Type": "application/merge-patch+json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400
    code, _, _ = call(cluster, "PATCH", f"{PJ}/demo/status", {"status": {"phase": "Running", "bestFitness": 1.5}},
                      ctype="application/merge-patch+json")
    assert code == 200   # a finite body still goes through
    yaml_body = b"apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: y}\nspec: {size: .nan}\n"
    req = urllib.request.Request(cluster.url + WIDGETS, data=yaml_body, method="POST",
                                 headers={"Content-Type": "application/yaml"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400
    assert cluster.get("prunejobs", "demo")["status"]["bestFitness"] == 1.5


def test_a_status_write_outside_the_status_schema_is_refused(cluster):
    cluster.create(prunejob())
    with pytest.raises(ClusterApiError) as err:
        cluster.patch("prunejobs", "demo", {"status": {"phase": "Hacked"}}, subresource="status")
    assert err.value.code == 422 and 'status.phase: Unsupported value: "Hacked"' in err.value.status["message"]


def test_cel_rules_refuse_on_create(cluster):
    with pytest.raises(ClusterApiError) as err:
        cluster.create(prunejob(target={"ratio": 0.9}, calibration={"text": "same"}, fitness={"heldOutText": "same"}))
    message = err.value.status["message"]
    assert 'spec.target: Invalid value: "object": ratio must lie between minRate and maxRate' in message
    assert 'spec: Invalid value: "object": fitness.heldOutText must differ from calibration.text' in message


def test_transition_rules_run_only_on_update_with_the_old_value(cluster):
    cluster.create(prunejob())          # no oldSelf on create: the transition rules do not run
    with pytest.raises(ClusterApiError) as err:
        cluster.patch("prunejobs", "demo", {"spec": {"model": {"source": "other"}}})
    assert err.value.status["message"] == ('PruneJob.selfpruner.io "demo" is invalid: spec: Invalid value: "object": '
                                           "model cannot change once the search started; create a new PruneJob")
    assert cluster.patch("prunejobs", "demo", {"spec": {"suspend": True, "llm": {"timeoutSeconds": 5}}})
    cluster.create(widget(frozen=True, size=2))
    with pytest.raises(ClusterApiError):
        cluster.patch("widgets", "w", {"spec": {"size": 3}})


def test_a_rule_that_errors_at_runtime_is_invalid(cluster):
    with pytest.raises(ClusterApiError) as err:
        cluster.create(widget(bounds={}))
    assert err.value.status["details"]["causes"] == [{
        "reason": "FieldValueInvalid", "field": "spec.bounds",
        "message": 'Invalid value: "object": no such key: low evaluating rule: low must not be negative'}]


def test_ratcheting_status_writes_do_not_revalidate_the_spec(cluster):
    cluster.create(widget(size=9))
    crd = cluster.get("customresourcedefinitions", "widgets.example.com")
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["size"]["maximum"] = 5
    call(cluster, "PUT", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com", crd)
    assert cluster.patch("widgets", "w", {"status": {"phase": "Ready"}}, subresource="status")
    assert cluster.patch("widgets", "w", {"metadata": {"labels": {"a": "b"}}})     # spec unchanged: allowed
    with pytest.raises(ClusterApiError, match="should be less than or equal to 5"):
        cluster.patch("widgets", "w", {"spec": {"size": 8}})


def test_a_crd_whose_rule_does_not_compile_is_refused(cluster):
    crd = json.loads(json.dumps(WIDGET_CRD).replace("widgets", "gadgets").replace("Widget", "Gadget"))
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"] = [{"rule": "self.spec >"}]
    with pytest.raises(ClusterApiError) as err:
        cluster.create(crd)
    assert err.value.code == 422 and "compilation failed" in err.value.status["message"]


def test_generation_bumps_on_spec_changes_only(cluster):
    body = prunejob()
    body["metadata"]["finalizers"] = ["example.com/keep"]
    cluster.create(body)
    gen = lambda: cluster.get("prunejobs", "demo")["metadata"]["generation"]  # noqa: E731
    cluster.patch("prunejobs", "demo", {"metadata": {"labels": {"a": "b"}}})
    cluster.patch("prunejobs", "demo", {"status": {"phase": "Running"}}, subresource="status")
    assert gen() == 1
    cluster.patch("prunejobs", "demo", {"spec": {"suspend": True}})
    assert gen() == 2
    cluster.delete("prunejobs", "demo")       # deletion pending on a finalizer is a change too
    assert gen() == 3
    cluster.create(job("j", suspend=True))
    cluster.patch("jobs.batch", "j", {"metadata": {"labels": {"x": "y"}}})
    assert cluster.get("jobs", "j")["metadata"]["generation"] == 1
    assert cluster.patch("jobs.batch", "j", {"spec": {"suspend": False}})["metadata"]["generation"] == 2


def _refused(cluster, body, *expected):
    with pytest.raises(ClusterApiError) as err:
        cluster.create(body)
    assert err.value.code == 422, err.value.status
    for text in expected:
        assert text in err.value.status["message"], err.value.status["message"]


def test_a_job_the_api_server_would_refuse_is_refused(cluster):
    """batch/v1 validation of what a Job from this project can carry: the pod template's
    restartPolicy, resources, tolerations and node affinity, and the podFailurePolicy rules."""
    def with_pod(name, **pod):
        body = job(name)
        body["spec"]["template"]["spec"].update(pod)
        return body
    _refused(cluster, with_pod("always", restartPolicy="Always"),
             'spec.template.spec.restartPolicy: Unsupported value: "Always": supported values: "OnFailure", "Never"')
    main = {"name": "main", "image": "busybox"}
    _refused(cluster, with_pod("negative", containers=[{**main, "resources": {"requests": {"cpu": "-4"}}}]),
             "spec.template.spec.containers[0].resources.requests[cpu]: Invalid value: \"-4\": must be greater "
             "than or equal to 0")
    _refused(cluster, with_pod("over", containers=[{**main, "resources": {"requests": {"memory": "2Gi"},
                                                                          "limits": {"memory": "1Gi"}}}]),
             "must be less than or equal to memory limit of 1Gi")
    _refused(cluster, with_pod("tol", tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "value": "x"},
                                                   {"key": "k", "effect": "NoSchedule", "tolerationSeconds": 5}]),
             "spec.template.spec.tolerations[0].operator: Invalid value: \"x\": value must be empty when "
             "`operator` is 'Exists'",
             "spec.template.spec.tolerations[1].effect: Invalid value: \"NoSchedule\": effect must be 'NoExecute' "
             "when `tolerationSeconds` is set")
    _refused(cluster, with_pod("aff", affinity={"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}),
        "nodeSelectorTerms: Required value: must have at least one node selector term")
    rule = {"action": "FailIndex", "onExitCodes": {"containerName": "worker", "operator": "In", "values": [3, 0, 3]}}
    _refused(cluster, job("pfp", podFailurePolicy={"rules": [rule]}),
             'spec.podFailurePolicy.rules[0].action: Invalid value: "FailIndex": requires the backoffLimitPerIndex',
             'onExitCodes.containerName: Invalid value: "worker": must be one of the container',
             "values[1]: Invalid value: 0: must not be 0 for the In operator",
             "values[1]: Invalid value: 0: must be ordered", "values[2]: Duplicate value: 3")
    on_failure = job("onfail", podFailurePolicy={"rules": [{"action": "Ignore", "onPodConditions": [
        {"type": "DisruptionTarget", "status": "True"}]}]})
    on_failure["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"
    _refused(cluster, on_failure, 'only "Never" is supported when podFailurePolicy is specified')
    assert not cluster.list("jobs")


def test_a_jobs_template_and_completions_are_immutable_except_scheduling_while_suspended(cluster):
    """The selector is generated onto the pod template (the Job's own labels are left alone), and
    an update may not change the template, completions or the failure policy; a suspended Job that
    never ran may change its pods' scheduling fields (what Kueue does on admission)."""
    created = cluster.create(job("imm", suspend=True, completionMode="Indexed", completions=2, parallelism=2))
    uid = created["metadata"]["uid"]
    assert created["spec"]["selector"] == {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    assert created["spec"]["template"]["metadata"]["labels"]["job-name"] == "imm"
    assert "job-name" not in (created["metadata"].get("labels") or {})
    patched = cluster.patch("jobs.batch", "imm", {"spec": {"template": {"spec": {"nodeSelector": {"gpu": "h100"}}}}})
    assert patched["spec"]["template"]["spec"]["nodeSelector"] == {"gpu": "h100"}
    for change in ({"template": {"spec": {"containers": [{"name": "main", "image": "other"}]}}},
                   {"completions": 3}, {"selector": {"matchLabels": {"a": "b"}}}):
        with pytest.raises(ClusterApiError) as err:
            cluster.patch("jobs.batch", "imm", {"spec": change})
        assert err.value.code == 422 and "field is immutable" in err.value.status["message"], change
    assert cluster.patch("jobs.batch", "imm", {"spec": {"completions": 4, "parallelism": 4}})  # elastic: both at once


def test_stale_or_missing_resource_version_on_put(cluster):
    first = cluster.create(prunejob())
    cluster.patch("prunejobs", "demo", {"spec": {"suspend": True}})
    code, _, status = call(cluster, "PUT", f"{PJ}/demo", first)
    assert code == 409 and status["reason"] == "Conflict"
    del first["metadata"]["resourceVersion"]
    code, _, status = call(cluster, "PUT", f"{PJ}/demo", first)
    assert code == 422 and "metadata.resourceVersion: Invalid value: 0: must be specified for an update" in \
        status["message"]


def test_names_are_dns_subdomains_and_namespaces_dns_labels(cluster):
    with pytest.raises(ClusterApiError) as err:
        cluster.create(prunejob("Bad_Name"))
    assert err.value.status["message"].startswith(
        'PruneJob.selfpruner.io "Bad_Name" is invalid: metadata.name: Invalid value: "Bad_Name": a lowercase RFC '
        "1123 subdomain must consist of")
    assert cluster.create(prunejob("a.b-c"))
    with pytest.raises(ClusterApiError, match="RFC 1123 label"):
        cluster.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a.b"}})
    with pytest.raises(ClusterApiError, match="must be no more than 253 characters"):
        cluster.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a" * 254}})


def test_a_job_name_longer_than_63_characters_is_refused(cluster):
    assert cluster.create(job("a" * 63))
    with pytest.raises(ClusterApiError) as err:
        cluster.create(job("b" * 64))
    assert err.value.code == 422
    assert err.value.status["message"].startswith(f'Job.batch "{"b" * 64}" is invalid: [spec.template.labels: '
                                                  f'Invalid value: "{"b" * 64}": must be no more than 63 characters')


@pytest.mark.parametrize("name,completions,ok", [
    ("a" * 61, 10, True),       # a...a-9 is 63 characters
    ("a" * 61, 11, False),      # a...a-10 is 64
    ("a" * 62, 1, False),       # a...a-0 is 64, even with one completion
    ("dotted.name", 2, False),  # a hostname is a DNS label: no dots
])
def test_an_indexed_jobs_last_pod_hostname_must_be_a_dns_label(cluster, name, completions, ok):
    body = job(name, completionMode="Indexed", completions=completions, parallelism=1)
    if ok:
        assert cluster.create(body)
        return
    with pytest.raises(ClusterApiError) as err:
        cluster.create(body)
    assert f'metadata.name: Invalid value: "{name}": will not able to create pod with invalid DNS label: ' \
           f"{name}-{completions - 1}" in err.value.status["message"]


def test_a_dotted_non_indexed_job_name_is_fine(cluster):
    assert cluster.create(job("dotted.name", completions=2))


def test_label_keys_values_and_annotation_size_are_validated(cluster):
    for labels, text in (({"bad key": "v"}, "name part must consist of"), ({"a": "-v"}, "a valid label must be"),
                         ({"a": "v" * 64}, "must be no more than 63 characters"),
                         ({"Bad_Prefix/a": "v"}, "prefix part a lowercase RFC 1123 subdomain")):
        body = prunejob()
        body["metadata"]["labels"] = labels
        with pytest.raises(ClusterApiError, match="metadata.labels: Invalid value") as err:
            cluster.create(body)
        assert text in err.value.status["message"]
    cluster.create(prunejob())
    with pytest.raises(ClusterApiError, match="metadata.annotations: Too long: must have at most 262144 bytes"):
        cluster.patch("prunejobs", "demo", {"metadata": {"annotations": {"big": "x" * 262144}}})


def test_objects_need_an_existing_namespace(cluster):
    with pytest.raises(ClusterApiError) as err:
        cluster.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}, namespace="nowhere")
    assert err.value.code == 404 and err.value.status["message"] == 'namespaces "nowhere" not found'


def test_owner_references_cascade_and_orphan(cluster):
    owner = cluster.create(prunejob())
    ref = {"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob", "name": "demo",
           "uid": owner["metadata"]["uid"], "controller": True}
    for name in ("kept", "gone"):
        cluster.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "ownerReferences": [ref]}})
    cluster.delete("prunejobs", "demo")
    assert cluster.get("configmaps", "kept") is None and cluster.get("configmaps", "gone") is None
    owner = cluster.create(prunejob())
    ref["uid"] = owner["metadata"]["uid"]
    cluster.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kept", "ownerReferences": [ref]}})
    cluster.request("DELETE", f"{PJ}/demo", {"propagationPolicy": "Orphan"})
    assert "ownerReferences" not in cluster.get("configmaps", "kept")["metadata"]
    with pytest.raises(ClusterApiError, match="uid must not be empty"):
        cluster.create({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": "x", "ownerReferences": [{**ref, "uid": ""}]}})


def test_injected_faults_answer_the_next_matching_requests(cluster):
    cluster.create(prunejob())
    added = []
    thread = threading.Thread(target=lambda: added.append(
        cluster.faults.add(code=503, method="PATCH", path_regex=r"/prunejobs/", times=2)))
    thread.start()
    thread.join()
    for _ in range(2):
        code, _, status = call(cluster, "PATCH", f"{PJ}/demo", {"spec": {"suspend": True}},
                               ctype="application/merge-patch+json")
        assert code == 503 and status["reason"] == "ServiceUnavailable"
    assert cluster.get("prunejobs", "demo")            # a GET does not match
    assert cluster.patch("prunejobs", "demo", {"spec": {"suspend": True}})["spec"]["suspend"] is True
    assert added[0].hits == 2 and cluster.faults.pending() == []
    cluster.faults.add(code=429, method="GET", retry_after=7)
    code, headers, status = call(cluster, "GET", f"{PJ}/demo")
    assert code == 429 and headers["Retry-After"] == "7" and status["details"]["retryAfterSeconds"] == 7
    for code in (500, 504):
        cluster.faults.add(code=code)
        assert call(cluster, "GET", f"{PJ}/demo")[0] == code


def test_a_connection_reset_fault_closes_without_an_answer(cluster):
    cluster.faults.add(reset=True, method="GET", path_regex=r"/prunejobs")
    with pytest.raises((ConnectionError, urllib.error.URLError)) as err:
        call(cluster, "GET", PJ)
    assert not isinstance(err.value, urllib.error.HTTPError)
    assert call(cluster, "GET", PJ)[0] == 200
