"""The Helm chart (charts/selfpruner): lints, renders valid Kubernetes 1.33 objects, runs every pod
restricted, ships the repository's CRD unchanged, and grants exactly the API calls the code makes."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from selfpruner.cluster import manifests

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "selfpruner"
ALL_FEATURES = CHART / "ci" / "values-all-features.yaml"
HELM = ROOT / "tools" / "bin" / "helm"
K8S = "1.33"
RELEASE, NAMESPACE = "sp", "selfpruner-system"

if not HELM.exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"{HELM} is missing in CI: the Makefile's test target builds tools/bin first")
    pytestmark = pytest.mark.skip(reason=f"{HELM} is absent (run `make tools/bin/helm`); not in CI")

VALUES = {"defaults": [], "all-features": ["-f", str(ALL_FEATURES)]}


def helm(*args: str) -> str:
    out = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


_rendered: dict[str, list[dict]] = {}


def render(which: str) -> list[dict]:
    if which not in _rendered:
        text = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *VALUES[which])
        _rendered[which] = [d for d in yaml.safe_load_all(text) if d]
    return _rendered[which]


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


@pytest.mark.parametrize("which", VALUES)
def test_lint(which):
    helm("lint", "--strict", str(CHART), *VALUES[which])


def test_schema_rejects_bad_values():
    out = subprocess.run([str(HELM), "template", RELEASE, str(CHART), "--set", "rbac.scope=everywhere"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "rbac.scope" in out.stderr


MONITORING_SPEC = {"ServiceMonitor": "endpoints", "PodMonitor": "podMetricsEndpoints"}


def operator_monitors(objs) -> list[dict]:
    """The ServiceMonitor/PodMonitor of the operator (not the controllers')."""
    return [o for o in objs if o["kind"] in MONITORING_SPEC and o not in controller_monitors(objs)]


@pytest.mark.parametrize("which", VALUES)
def test_every_object_is_valid_kubernetes(which):
    objs = render(which)
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "ServiceAccount", "CustomResourceDefinition"} <= kinds
    for obj in objs:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            # prometheus-operator CRs: kubernetes-validate has no schema, so check the structure
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            assert obj["kind"] in MONITORING_SPEC or obj["kind"] == "PrometheusRule"
            assert obj["metadata"]["namespace"] == NAMESPACE
            if obj["kind"] == "PrometheusRule":
                continue  # test_chart_alerts.py: promtool checks its groups
            if obj in controller_monitors(objs):
                continue  # test_controller_pod_monitor_selects_the_controller_pods
            spec = obj["spec"]
            deploy = by_kind(objs, "Deployment")[0]
            # a ServiceMonitor selects the Service (by its labels), a PodMonitor the pod
            target = by_kind(objs, "Service")[0]["metadata"] if obj["kind"] == "ServiceMonitor" \
                else deploy["spec"]["template"]["metadata"]
            assert spec["selector"]["matchLabels"].items() <= target["labels"].items(), obj["kind"]
            assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
            assert [e["port"] for e in spec[MONITORING_SPEC[obj["kind"]]]] == ["metrics"]
            continue
        kubernetes_validate.validate(obj, K8S, strict=True)


def test_features_toggle():
    default, full = render("defaults"), render("all-features")
    assert not [o for o in default if o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert sorted(o["kind"] for o in full if o["apiVersion"].startswith("monitoring.coreos.com/")) == \
        ["PodMonitor", "PrometheusRule", "ServiceMonitor"]
    assert len(controller_monitors(full)) == 1
    assert not [o for o in default if o["kind"] == "ConfigMap"]
    (dash,) = by_kind(full, "ConfigMap")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(next(iter(dash["data"].values())))
    assert board["panels"] and any("selfpruner_prunejobs" in t["expr"] for p in board["panels"] for t in p["targets"])
    assert "${" not in json.dumps(board).replace("${datasource}", "")


def test_operator_deployment():
    for which, objs in ((w, render(w)) for w in VALUES):
        (deploy,) = by_kind(objs, "Deployment")
        assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"] == {"type": "Recreate"}
        pod = deploy["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        cmd = c["command"]
        assert cmd[:3] == ["kopf", "run", "--standalone"] and cmd[-2:] == ["-m", "selfpruner_operator.handlers"]
        assert "--liveness=http://0.0.0.0:8080/healthz" in cmd
        env = {e["name"]: e["value"] for e in c["env"]}
        assert {"SELFPRUNER_IMAGE", "SELFPRUNER_CONTROLLER_SERVICE_ACCOUNT", "SELFPRUNER_MAX_CONTROLLER_RESTARTS",
                "SELFPRUNER_RECONCILE_INTERVAL", "SELFPRUNER_METRICS_PORT", "SELFPRUNER_CONTROLLER_START_TIMEOUT",
                "SELFPRUNER_POLICY", "SELFPRUNER_DEFAULTS"} <= env.keys()
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["metrics"] == 9090 and ports["liveness"] == 8080
        assert int(env["SELFPRUNER_METRICS_PORT"]) == ports["metrics"]
        (svc,) = by_kind(objs, "Service")
        assert svc["spec"]["ports"][0]["name"] == "metrics"
        assert svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
        sas = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in by_kind(objs, "ServiceAccount")}
        assert (NAMESPACE, pod["serviceAccountName"]) in sas
        if which == "defaults":
            assert "--all-namespaces" in cmd and not any(a.startswith("--namespace") for a in cmd)
            assert env["SELFPRUNER_IMAGE"] == "selfpruner-pruner:0.1.0"
            assert (NAMESPACE, env["SELFPRUNER_CONTROLLER_SERVICE_ACCOUNT"]) in sas
        else:
            assert "--all-namespaces" not in cmd
            assert [a for a in cmd if a.startswith("--namespace")] == \
                ["--namespace=ml-research", "--namespace=ml-prod"]
            assert env["SELFPRUNER_IMAGE"] == "registry.example/selfpruner-pruner:0.1.0"
            assert pod["imagePullSecrets"] == [{"name": "registry-creds"}]
            assert pod["nodeSelector"] and pod["tolerations"] and pod["affinity"]
            for ns in ("ml-research", "ml-prod"):
                assert (ns, env["SELFPRUNER_CONTROLLER_SERVICE_ACCOUNT"]) in sas


def assert_restricted(pod: dict, where: str):
    psc = pod.get("securityContext") or {}
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
    assert not any("hostPath" in v for v in pod.get("volumes") or []), where
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where
        # no uid unless the installation fixes one (OpenShift's restricted-v2 assigns one of the
        # namespace's range); the images' USER is numeric and non-root (test_dockerfile.py)
        assert sc.get("runAsUser", psc.get("runAsUser")) in (None, 10001), where
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), where
        assert (sc.get("seccompProfile") or psc.get("seccompProfile"))["type"] == "RuntimeDefault", where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert not sc.get("privileged"), where
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert "tmp" == mounts.get("/tmp"), where
        assert {"name": "tmp", "emptyDir": {}} in pod["volumes"], where


def system_jobs():
    from test_manifests import prunejob  # tests/ is on sys.path (rootdir conftest)

    pj = prunejob(evaluator={"nodeCache": ""})
    image = "registry.example/selfpruner-pruner:0.1.0"
    return {"controller": manifests.controller_job(pj, image=image, service_account="selfpruner-controller"),
            "evaluation": manifests.evaluation_job(pj, generation=1, shards=2, image=image, batch="abc"),
            "finalize": manifests.finalize_job(pj, image=image)}


def test_every_pod_is_restricted():
    for which in VALUES:
        for obj in render(which):
            if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
                assert_restricted(obj["spec"]["template"]["spec"], f"{which}: {obj['kind']} {obj['metadata']['name']}")
    for name, job in system_jobs().items():
        assert_restricted(job["spec"]["template"]["spec"], f"system Job {name}")


def controller_monitors(objs) -> list[dict]:
    return [o for o in by_kind(objs, "PodMonitor") if o["metadata"]["name"] == f"{RELEASE}-selfpruner-controller"]


def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes LabelSelector (matchLabels, matchExpressions) against a pod's labels."""
    ops = {"In": lambda k, v: labels.get(k) in v, "NotIn": lambda k, v: labels.get(k) not in v,
           "Exists": lambda k, v: k in labels, "DoesNotExist": lambda k, v: k not in labels}
    return (selector.get("matchLabels", {}).items() <= labels.items()
            and all(ops[e["operator"]](e["key"], e.get("values") or []) for e in selector.get("matchExpressions", [])))


def test_controller_pod_monitor_selects_the_controller_pods():
    jobs = system_jobs()
    pod_labels = {name: job["spec"]["template"]["metadata"]["labels"] for name, job in jobs.items()}
    (container,) = jobs["controller"]["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    served = int({e["name"]: e.get("value") for e in container["env"]}["SELFPRUNER_METRICS_PORT"])
    assert not controller_monitors(render("defaults"))  # off unless asked for
    cluster_scope = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                         "--set", "metrics.controllerPodMonitor.enabled=true,metrics.podMonitor.enabled=true")
    for objs in (render("all-features"), [d for d in yaml.safe_load_all(cluster_scope) if d]):
        (monitor,) = controller_monitors(objs)
        selector = monitor["spec"]["selector"]
        assert selects(selector, pod_labels["controller"])
        assert not selects(selector, pod_labels["evaluation"]) and not selects(selector, pod_labels["finalize"])
        (deploy,) = by_kind(objs, "Deployment")
        assert not selects(selector, deploy["spec"]["template"]["metadata"]["labels"])
        for operator_monitor in operator_monitors(objs):
            assert not selects(operator_monitor["spec"]["selector"], pod_labels["controller"])
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert ports[endpoint["port"]] == served, (endpoint, ports)  # the named port is the one served
        # controllers run where their ServiceAccount is: every such namespace, and no other
        env = {e["name"]: e["value"] for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
        controller_sa = env["SELFPRUNER_CONTROLLER_SERVICE_ACCOUNT"]
        namespaces = [o["metadata"]["namespace"] for o in by_kind(objs, "ServiceAccount")
                      if o["metadata"]["name"] == controller_sa]
        assert sorted(monitor["spec"]["namespaceSelector"]["matchNames"]) == sorted(namespaces)


def test_crd_is_the_repository_crd():
    copy = CHART / "files" / "prunejob.yaml"
    assert copy.read_bytes() == (ROOT / "crds" / "prunejob.yaml").read_bytes(), \
        "charts/selfpruner/files/prunejob.yaml must be a copy of crds/prunejob.yaml: cp crds/prunejob.yaml " + str(copy)
    expected = yaml.safe_load((ROOT / "crds" / "prunejob.yaml").read_text())
    (crd,) = by_kind(render("defaults"), "CustomResourceDefinition")
    assert crd["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
    crd["metadata"].pop("labels")
    assert crd == expected
    out = helm("template", RELEASE, str(CHART), "--set", "crds.install=false")
    assert "CustomResourceDefinition" not in out


# --- RBAC: exactly what the code calls ---------------------------------------------------------

# kubernetes client methods -> (apiGroup, resource, verb). A method missing here fails the test:
# add it, and the rule to the chart.
CLIENT_METHODS = {
    "create_namespaced_job": ("batch", "jobs", "create"),
    "read_namespaced_job": ("batch", "jobs", "get"),
    "list_namespaced_job": ("batch", "jobs", "list"),
    "patch_namespaced_job": ("batch", "jobs", "patch"),
    "delete_namespaced_job": ("batch", "jobs", "delete"),
    "list_namespaced_pod": ("", "pods", "list"),
    "list_namespaced_event": ("", "events", "list"),
    "get_namespaced_custom_object": ("selfpruner.io", "prunejobs", "get"),
    "patch_namespaced_custom_object": ("selfpruner.io", "prunejobs", "patch"),
    "patch_namespaced_custom_object_status": ("selfpruner.io", "prunejobs/status", "patch"),
    "list_namespaced_custom_object": ("selfpruner.io", "prunejobs", "list"),
    "create_namespaced_event": ("", "events", "create"),
}
CALL = re.compile(r"\.((?:create|read|get|list|patch|replace|delete|watch)_(?:namespaced|cluster)_\w+)\b")
# kube.py is the one client layer: its methods (and helpers taking a Kube) -> the client methods they call
KUBE_CALLS = {
    "create_job": {"create_namespaced_job", "read_namespaced_job"}, "read_job": {"read_namespaced_job"},
    "list_jobs": {"list_namespaced_job"}, "delete_job": {"delete_namespaced_job"},
    "patch_job": {"patch_namespaced_job"}, "list_pods": {"list_namespaced_pod"},
    "job_events": {"list_namespaced_event"}, "read_prunejob": {"get_namespaced_custom_object"},
    "patch_status": {"patch_namespaced_custom_object_status", "get_namespaced_custom_object"},
    "event": {"create_namespaced_event"}, "job_stuck": {"list_namespaced_pod", "list_namespaced_event"},
}
KUBE_CALL = re.compile(r"\bkube\.(" + "|".join(KUBE_CALLS) + r")\(|\b(job_stuck)\(")

# What kopf itself does for our handlers (kopf 1.x; see kopf's docs "Deployment" RBAC and
# kopf/_core/reactor/observation.py, kopf/_cogs/clients/patching.py, events.py):
KOPF_NAMESPACED = {
    ("selfpruner.io", "prunejobs", "list"),    # the watcher's initial listing
    ("selfpruner.io", "prunejobs", "watch"),   # the watch stream
    ("selfpruner.io", "prunejobs", "patch"),   # finalizers and progress annotations (merge-patch)
    ("selfpruner.io", "prunejobs/status", "patch"),  # the handlers' patch.status (status subresource)
    ("", "events", "create"),                  # kopf.info/kopf.warn and handler logs posted as Events
}
KOPF_CLUSTER = {
    # runtime observation of CRDs (rbac.observeCRDs, scope cluster); without it the operator tells kopf
    # not to scan (SELFPRUNER_KOPF_SCANNING=false) and kopf finds the CRD once, at startup.
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    # no namespaces rule: kopf does not list namespaces with --all-namespaces; with --namespace names
    # it does unless told not to scan, and retries the refusal for about a minute before it serves
    # (the operator tests run under the chart's RBAC and caught it).
}

# Both create Jobs whose owner reference sets blockOwnerDeletion (manifests.owner_reference); with the
# OwnerReferencesPermissionEnforcement admission plugin that takes `update` on the owner's finalizers.
BLOCK_OWNER_DELETION = {("selfpruner.io", "prunejobs/finalizers", "update")}


def code_permissions(*paths: Path) -> set:
    """What the code in `paths` asks of the API server, through kube.py's methods."""
    methods = set()
    for path in paths:
        methods |= {m for names in KUBE_CALL.findall(path.read_text()) for m in KUBE_CALLS["".join(names)]}
    assert methods, f"no Kubernetes calls found in {paths}"
    return {CLIENT_METHODS[m] for m in methods}


OPERATOR_CODE = [ROOT / "operator" / "selfpruner_operator" / "handlers.py"]
CONTROLLER_CODE = [ROOT / "pruner_image" / "selfpruner" / "cluster" / f for f in ("controller.py", "k8s_executor.py")]
KUBE_CODE = ROOT / "pruner_image" / "selfpruner" / "cluster" / "kube.py"


def test_code_scan_finds_the_calls():
    # kube.py calls exactly the client methods KUBE_CALLS says, all of them mapped to RBAC rules
    used = set(CALL.findall(KUBE_CODE.read_text()))
    assert used == set().union(*KUBE_CALLS.values()) and used <= CLIENT_METHODS.keys(), used
    # nothing else talks to the API server on its own
    for path in OPERATOR_CODE + CONTROLLER_CODE:
        assert not CALL.findall(path.read_text()), f"{path} calls the client directly: go through kube.py"
    assert code_permissions(*OPERATOR_CODE) == {("batch", "jobs", v) for v in ("create", "get", "list", "patch", "delete")} \
        | {("", "pods", "list"), ("", "events", "list")}
    assert code_permissions(*CONTROLLER_CODE) >= {
        ("batch", "jobs", "create"), ("batch", "jobs", "get"), ("selfpruner.io", "prunejobs", "get"),
        ("selfpruner.io", "prunejobs/status", "patch"), ("", "events", "create")}


def rules_of(role: dict) -> set:
    out = set()
    for rule in role["rules"]:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), role["metadata"]["name"]
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                for v in rule["verbs"]:
                    assert "*" not in (g, r, v), f"wildcard in {role['kind']} {role['metadata']['name']}"
                    out.add((g, r, v))
    return out


def grants(objs, sa_namespace: str, sa_name: str) -> dict:
    """{namespace or None (cluster-wide): permissions} for one ServiceAccount, through its bindings."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
             for o in objs if o["kind"] in ("Role", "ClusterRole")}
    out: dict = {}
    for b in objs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if {"kind": "ServiceAccount", "name": sa_name, "namespace": sa_namespace} not in b["subjects"]:
            continue
        ref = b["roleRef"]
        ns = b["metadata"].get("namespace")
        role = roles[(ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])]
        scope = None if b["kind"] == "ClusterRoleBinding" else ns
        out.setdefault(scope, set()).update(rules_of(role))
    return out


@pytest.mark.parametrize("which", VALUES)
def test_rbac_is_exactly_what_the_code_calls(which):
    objs = render(which)
    (deploy,) = by_kind(objs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    operator = grants(objs, NAMESPACE, pod["serviceAccountName"])
    namespaced = code_permissions(*OPERATOR_CODE) | KOPF_NAMESPACED | BLOCK_OWNER_DELETION
    if which == "defaults":  # rbac.scope=cluster
        assert operator == {None: namespaced | KOPF_CLUSTER}
        assert env["SELFPRUNER_KOPF_SCANNING"] == "true"
        watched = [NAMESPACE]
    else:  # rbac.scope=namespaced, two namespaces: kopf does not scan, so nothing cluster-wide
        watched = ["ml-research", "ml-prod"]
        assert operator == {ns: namespaced for ns in watched}
        assert env["SELFPRUNER_KOPF_SCANNING"] == "false"
    controller_needs = code_permissions(*CONTROLLER_CODE) | BLOCK_OWNER_DELETION
    for ns in watched:
        assert grants(objs, ns, env["SELFPRUNER_CONTROLLER_SERVICE_ACCOUNT"]) == {ns: controller_needs}
    # nothing else is bound to anyone
    bound = {(s["namespace"], s["name"]) for b in objs if b["kind"].endswith("Binding") for s in b["subjects"]}
    assert bound == {(NAMESPACE, pod["serviceAccountName"])} | \
        {(ns, env["SELFPRUNER_CONTROLLER_SERVICE_ACCOUNT"]) for ns in watched}


def test_namespaced_scope_has_no_cluster_rules_and_kopf_scans_only_where_granted():
    text = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", str(ALL_FEATURES),
                "--set", "rbac.aggregateRoles=false")
    objs = [d for d in yaml.safe_load_all(text) if d]
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    # scope cluster without the CRD rules: kopf is told not to scan
    text = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--set", "rbac.observeCRDs=false")
    (deploy,) = by_kind([d for d in yaml.safe_load_all(text) if d], "Deployment")
    env = {e["name"]: e["value"] for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SELFPRUNER_KOPF_SCANNING"] == "false"


def test_installation_defaults_reach_the_operator_as_it_reads_them():
    from selfpruner.cluster import defaults

    for which in VALUES:
        (deploy,) = by_kind(render(which), "Deployment")
        env = {e["name"]: e["value"] for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
        given = yaml.safe_load(ALL_FEATURES.read_text())["defaults"] if which == "all-features" else {}
        loaded = defaults.load({"SELFPRUNER_DEFAULTS": env["SELFPRUNER_DEFAULTS"]})
        assert {k: v for k, v in loaded.items() if v} == given
    # the schema's fields are the CRD's, so whatever the chart accepts a PruneJob would too
    crd = yaml.safe_load((ROOT / "crds" / "prunejob.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["defaults"]["properties"]
    assert schema["storage"]["properties"].keys() == spec["storage"]["properties"].keys()
    assert schema["storage"]["properties"]["uri"]["pattern"] == spec["storage"]["properties"]["uri"]["pattern"]
    assert schema["llm"]["properties"].keys() == set(defaults.LLM_FIELDS) <= spec["llm"]["properties"].keys()
    for bad in ("defaults.storage.uri=minio/bucket", "defaults.llm.model=x", "defaults.storage.endpointURL=http://m"):
        out = subprocess.run([str(HELM), "template", RELEASE, str(CHART), "--set", bad],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "defaults" in out.stderr, (bad, out.stderr[-500:])


def test_the_policy_reaches_the_operator_as_it_reads_it():
    from selfpruner.cluster import policy

    for which in VALUES:
        (deploy,) = by_kind(render(which), "Deployment")
        env = {e["name"]: e["value"] for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
        loaded = policy.load({"SELFPRUNER_POLICY": env["SELFPRUNER_POLICY"]})
        if which == "all-features":
            assert loaded == yaml.safe_load(ALL_FEATURES.read_text())["policy"]
        else:  # the default: only the installation's Secrets and image, no hostPath, no demo inputs
            assert loaded == {"allowedSecrets": [], "allowedImagePrefixes": [],
                              "nodeCache": {"enabled": False, "path": "/var/cache/selfpruner"},
                              "allowedPriorityClasses": [], "allowedTolerationKeys": ["nvidia.com/gpu"],
                              "allowAffinity": False, "allowedWorkloadPriorityClasses": [],
                              "allowDemoTexts": False, "allowDemoModel": False}
    for bad in ("policy.nodeCache.path=relative", "policy.allowedSecret=x", "policy.allowDemoTexts=yes"):
        out = subprocess.run([str(HELM), "template", RELEASE, str(CHART), "--set", bad],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "policy" in out.stderr, (bad, out.stderr[-500:])


# --- the operator scraped once; people's roles; the README's tables ----------------------------------

def template(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(HELM), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args],
                          capture_output=True, text=True, timeout=60)


def test_the_operator_is_scraped_once():
    """A ServiceMonitor and a PodMonitor would both scrape the operator's pod: every count twice. The
    schema refuses both (and the template too, where the schema is skipped); either alone selects the
    operator and keeps the series' own `namespace` label (honorLabels)."""
    both = "metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true"
    out = template("--set", both)
    assert out.returncode != 0 and "metrics.podMonitor.enabled" in out.stderr, out.stderr
    out = template("--set", both, "--skip-schema-validation")
    assert out.returncode != 0 and "both scrape the operator's pod" in out.stderr, out.stderr
    for kind, value in (("ServiceMonitor", "metrics.serviceMonitor.enabled=true"),
                        ("PodMonitor", "metrics.podMonitor.enabled=true")):
        objs = [d for d in yaml.safe_load_all(helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                                                   "--set", value)) if d]
        (monitor,) = operator_monitors(objs)
        assert monitor["kind"] == kind
        (endpoint,) = monitor["spec"][MONITORING_SPEC[kind]]
        assert endpoint["honorLabels"] is True
        (svc,), (deploy,) = by_kind(objs, "Service"), by_kind(objs, "Deployment")
        pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
        if kind == "ServiceMonitor":  # it selects the Service, which selects the pod
            assert selects(monitor["spec"]["selector"], svc["metadata"]["labels"])
            assert svc["spec"]["selector"].items() <= pod_labels.items()
        else:
            assert selects(monitor["spec"]["selector"], pod_labels)
    assert not operator_monitors(render("defaults"))
    assert [m["kind"] for m in operator_monitors(render("all-features"))] == ["ServiceMonitor"]


VIEW = {("selfpruner.io", r, v) for r in ("prunejobs", "prunejobs/status") for v in ("get", "list", "watch")}
EDIT = VIEW | {("selfpruner.io", "prunejobs", v) for v in ("create", "update", "patch", "delete", "deletecollection")}
AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"


def test_people_get_prunejobs_through_the_built_in_roles():
    """<fullname>-view and -edit aggregate into view/edit/admin; nobody may write a status by them."""
    for which in VALUES:
        roles = {o["metadata"]["name"]: o for o in by_kind(render(which), "ClusterRole")}
        view, edit = roles[f"{RELEASE}-selfpruner-view"], roles[f"{RELEASE}-selfpruner-edit"]
        assert rules_of(view) == VIEW and rules_of(edit) == EDIT
        assert {k[len(AGGREGATE):] for k, v in view["metadata"]["labels"].items()
                if k.startswith(AGGREGATE) and v == "true"} == {"view", "edit", "admin"}
        assert {k[len(AGGREGATE):] for k, v in edit["metadata"]["labels"].items()
                if k.startswith(AGGREGATE) and v == "true"} == {"edit", "admin"}
        assert not {r for r in rules_of(view) | rules_of(edit) if r[1] == "prunejobs/status"} - VIEW
        # bound to nobody by the chart
        refs = {b["roleRef"]["name"] for b in render(which) if b["kind"].endswith("Binding")}
        assert not refs & {view["metadata"]["name"], edit["metadata"]["name"]}
    off = [d for d in yaml.safe_load_all(helm("template", RELEASE, str(CHART), "--set", "rbac.aggregateRoles=false")) if d]
    assert not [o for o in by_kind(off, "ClusterRole") if o["metadata"]["name"].endswith(("-view", "-edit"))]


API_GROUPS = {"prunejobs": "selfpruner.io", "prunejobs/status": "selfpruner.io", "prunejobs/finalizers": "selfpruner.io",
              "jobs": "batch", "pods": "", "events": "",
              "customresourcedefinitions": "apiextensions.k8s.io"}
README = CHART / "README.md"


def readme_table(heading: str) -> list[list[str]]:
    """The rows (cells) of the first table under `## heading` in the chart's README."""
    text = README.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


def test_the_readme_rbac_table_is_what_the_chart_grants():
    """Every rule of the chart's Roles is in the README's table, and nothing else is."""
    table: dict[str, set] = {}
    for identity, rule, _ in readme_table("RBAC: exactly what the code calls"):
        for part in rule.split(";"):
            m = re.fullmatch(r"`([a-z/]+)` ([a-z, ]+)", part.strip())
            assert m, f"README RBAC row {identity!r}: cannot read {part!r}"
            table.setdefault(identity.strip("`"), set()).update(
                (API_GROUPS[m.group(1)], m.group(1), v.strip()) for v in m.group(2).split(","))
    objs = render("defaults")
    (deploy,) = by_kind(objs, "Deployment")
    env = {e["name"]: e["value"] for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    operator = grants(objs, NAMESPACE, deploy["spec"]["template"]["spec"]["serviceAccountName"])
    controller = grants(objs, NAMESPACE, env["SELFPRUNER_CONTROLLER_SERVICE_ACCOUNT"])
    roles = {o["metadata"]["name"]: o for o in by_kind(objs, "ClusterRole")}
    assert table == {"operator": set().union(*operator.values()), "controller": set().union(*controller.values()),
                     "<fullname>-view": rules_of(roles[f"{RELEASE}-selfpruner-view"]),
                     "<fullname>-edit": rules_of(roles[f"{RELEASE}-selfpruner-edit"])}


def value_paths(node, prefix="") -> list[str]:
    """values.yaml's leaves (a map value, e.g. podLabels, counts as one)."""
    if isinstance(node, dict) and node:
        return [p for k, v in node.items() for p in value_paths(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")]


def test_the_readme_values_table_names_every_value():
    named = []
    for cells in readme_table("Values"):
        last = ""
        for token in re.findall(r"`([^`]+)`", cells[0]):
            if token.startswith("."):  # `.x` after `a.b`: a.x
                token = last.rsplit(".", 1)[0] + token
            named.append(token)
            last = token
    missing = []
    for path in value_paths(yaml.safe_load((CHART / "values.yaml").read_text())):
        if not any(path == t or path.startswith(t + ".") or (t.endswith(".*") and path.startswith(t[:-1]))
                   for t in named):
            missing.append(path)
    assert not missing, f"values missing from the README's Values table: {missing}"


# --- the pruner pods' installation settings -----------------------------------------------------------

def operator_env(objs) -> dict:
    (deploy,) = by_kind(objs, "Deployment")
    return {e["name"]: e["value"] for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_the_pruner_pod_settings_reach_every_pod_as_manifests_reads_them():
    """pruner.* (but the image) -> the operator's SELFPRUNER_PODS -> manifests.pod_settings -> the controller,
    evaluation and finalize pods, each knob where Kubernetes reads it; policy.check_job accepts them."""
    from test_manifests import prunejob
    from test_manifests_installation import job_pod, texts
    from selfpruner.cluster import defaults, policy

    values = yaml.safe_load(ALL_FEATURES.read_text())["pruner"]
    for which in VALUES:
        env = operator_env(render(which))
        pods = manifests.pod_settings({"SELFPRUNER_PODS": env["SELFPRUNER_PODS"]})
        pol, installation = policy.load(env), defaults.load(env)
        pol["allowedSecrets"] = [*pol.get("allowedSecrets", []), "s3-creds", "llm"]  # test_manifests' PruneJob's
        pj = prunejob(evaluator={"gpusPerPod": 2}, **texts())
        jobs = {"controller": manifests.controller_job(pj, image=env["SELFPRUNER_IMAGE"], service_account="sa",
                                                       policy=pol, installation=installation, pods=pods),
                "evaluation": manifests.evaluation_job(pj, generation=0, shards=2, image=env["SELFPRUNER_IMAGE"],
                                                       batch="abc", pods=pods),
                "finalize": manifests.finalize_job(pj, image=env["SELFPRUNER_IMAGE"], pods=pods)}
        for name, job in jobs.items():
            kubernetes_validate.validate(job, K8S, strict=True)
            policy.check_job(job, pj["spec"], pol, installation, env["SELFPRUNER_IMAGE"])
            assert_restricted(job["spec"]["template"]["spec"], f"{which}: {name}")
        (controller,) = jobs["controller"]["spec"]["template"]["spec"]["containers"]
        # the controller builds its Jobs with the same settings
        assert json.loads({e["name"]: e.get("value") for e in controller["env"]}["SELFPRUNER_PODS"]) == pods
        if which == "defaults":
            assert pods.get("imagePullPolicy") is None
            for name, job in jobs.items():
                pod = job_pod(job)
                assert "imagePullSecrets" not in pod and "runtimeClassName" not in pod, name
                assert not {"runAsUser", "runAsGroup", "fsGroup"} & pod["securityContext"].keys(), name
            assert controller["resources"] == manifests.CONTROLLER_RESOURCES
            assert job_pod(jobs["evaluation"])["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
            continue
        assert {k: v for k, v in pods.items() if k != "imagePullPolicy"} == {k: v for k, v in values.items() if k != "image"}
        for name, job in jobs.items():
            pod, template = job_pod(job), job["spec"]["template"]["metadata"]
            assert pod["imagePullSecrets"] == values["imagePullSecrets"], name
            assert all(c["imagePullPolicy"] == "Always" for c in pod["containers"]), name
            assert values["podLabels"].items() <= template["labels"].items(), name
            assert template["annotations"] == values["podAnnotations"], name
            assert {k: pod["securityContext"][k] for k in ("runAsUser", "runAsGroup", "fsGroup")} == \
                values["podSecurityContext"], name
            if name != "controller":
                assert pod["runtimeClassName"] == "nvidia", name
                resources = pod["containers"][0]["resources"]
                assert resources["limits"]["nvidia.com/mig-1g.10gb"] == resources["requests"]["nvidia.com/mig-1g.10gb"] == 2
                assert not any("nvidia.com/gpu" in r for r in resources.values()), name
        assert controller["resources"] == values["controller"]["resources"]
        assert "runtimeClassName" not in job_pod(jobs["controller"])


@pytest.mark.parametrize("flag,bad,where", [
    ("--set", "pruner.gpuResource=gpu", "pruner.gpuResource"),  # not an extended resource name (no domain)
    ("--set", "pruner.gpuResource=kubernetes.io/gpu", "pruner.gpuResource"),  # the kubernetes.io domain's
    ("--set", "pruner.runtimeClassName=Nvidia_Runtime", "pruner.runtimeClassName"),
    ("--set", "pruner.podLabels.app\\.kubernetes\\.io/component=x", "pruner.podLabels"),  # selfpruner's own
    ("--set", "pruner.podLabels.kueue\\.x-k8s\\.io/queue-name=q", "pruner.podLabels"),  # the PruneJob's to say
    ("--set", "pruner.podSecurityContext.runAsUser=0", "pruner.podSecurityContext.runAsUser"),  # root
    ("--set", "operator.podSecurityContext.runAsUser=0", "operator.podSecurityContext.runAsUser"),
    ("--set", "pruner.podSecurityContext.privileged=true", "pruner.podSecurityContext"),  # only uid/gid
    ("--set", "pruner.imagePullSecrets[0].nam=x", "pruner.imagePullSecrets"),
    ("--set-json", "metrics.prometheusRule.alerts.evaluationsFailing.threshold=1.5",
     "metrics.prometheusRule.alerts.evaluationsFailing.threshold"),
    ("--set", "metrics.prometheusRule.alerts.prunejobFailed.window=15 minutes",
     "metrics.prometheusRule.alerts.prunejobFailed.window"),
    ("--set", "policy.allowedWorkloadPriorityClasses[0]=", "policy.allowedWorkloadPriorityClasses"),
])
def test_the_schema_refuses_bad_installation_settings(flag, bad, where):
    out = template(flag, bad)
    assert out.returncode != 0 and f"- {where}" in out.stderr, (bad, out.stderr[-500:])


def test_openshift_values_set_no_uid():
    """With no podSecurityContext (the default) neither the operator's pod nor a pruner pod fixes a uid,
    gid or fsGroup: OpenShift's restricted-v2 SCC assigns them from the namespace's range."""
    (deploy,) = by_kind(render("defaults"), "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert "runAsUser" not in pod["containers"][0]["securityContext"]
    uid = [d for d in yaml.safe_load_all(helm("template", RELEASE, str(CHART), "--set",
                                              "operator.podSecurityContext.runAsUser=1000680000")) if d]
    (deploy,) = by_kind(uid, "Deployment")
    assert deploy["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 1000680000
