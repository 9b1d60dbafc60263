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


@pytest.mark.parametrize("which", VALUES)
def test_every_object_is_valid_kubernetes(which):
    objs = render(which)
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "ServiceAccount", "CustomResourceDefinition"} <= kinds
    for obj in objs:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            # prometheus-operator CRs: kubernetes-validate has no schema, so check the structure
            assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["kind"] in MONITORING_SPEC
            assert obj["metadata"]["namespace"] == NAMESPACE
            if obj in controller_monitors(objs):
                continue  # test_controller_pod_monitor_selects_the_controller_pods
            spec = obj["spec"]
            deploy = by_kind(objs, "Deployment")[0]
            assert spec["selector"]["matchLabels"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
            assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
            assert [e["port"] for e in spec[MONITORING_SPEC[obj["kind"]]]] == ["metrics"]
            continue
        kubernetes_validate.validate(obj, K8S, strict=True)


def test_features_toggle():
    default, full = render("defaults"), render("all-features")
    assert not [o for o in default if o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert sorted(o["kind"] for o in full if o["apiVersion"].startswith("monitoring.coreos.com/")) == \
        ["PodMonitor", "PodMonitor", "ServiceMonitor"]
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
        assert sc.get("runAsUser", psc.get("runAsUser")) == 10001, where
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
        (operator_monitor,) = [o for o in by_kind(objs, "PodMonitor") if o is not monitor]
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
    # runtime observation of CRDs (rbac.observeCRDs); optional: without it kopf scans once at startup.
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    # no namespaces rule: kopf lists namespaces only for --namespace patterns, never with
    # --all-namespaces; with exact --namespace names it falls back to them when forbidden.
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
        watched = [NAMESPACE]
    else:  # rbac.scope=namespaced, two namespaces
        watched = ["ml-research", "ml-prod"]
        assert operator == {None: KOPF_CLUSTER, **{ns: namespaced for ns in watched}}
    controller_needs = code_permissions(*CONTROLLER_CODE) | BLOCK_OWNER_DELETION
    for ns in watched:
        assert grants(objs, ns, env["SELFPRUNER_CONTROLLER_SERVICE_ACCOUNT"]) == {ns: controller_needs}
    # nothing else is bound to anyone
    bound = {(s["namespace"], s["name"]) for b in objs if b["kind"].endswith("Binding") for s in b["subjects"]}
    assert bound == {(NAMESPACE, pod["serviceAccountName"])} | \
        {(ns, env["SELFPRUNER_CONTROLLER_SERVICE_ACCOUNT"]) for ns in watched}


def test_observe_crds_off_leaves_no_cluster_rule_in_namespaced_scope():
    text = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", str(ALL_FEATURES),
                "--set", "rbac.observeCRDs=false")
    objs = [d for d in yaml.safe_load_all(text) if d]
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]


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
        else:  # the default: only the installation's Secrets and image, no hostPath
            assert loaded == {"allowedSecrets": [], "allowedImagePrefixes": [],
                              "nodeCache": {"enabled": False, "path": "/var/cache/selfpruner"},
                              "allowedPriorityClasses": [], "allowedTolerationKeys": ["nvidia.com/gpu"],
                              "allowAffinity": False}
    for bad in ("policy.nodeCache.path=relative", "policy.allowedSecret=x"):
        out = subprocess.run([str(HELM), "template", RELEASE, str(CHART), "--set", bad],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "policy" in out.stderr, (bad, out.stderr[-500:])
