"""The emulated API server authenticates bearer tokens and authorizes by RBAC, as kube-apiserver
does: what a ServiceAccount was not granted is refused (403) here too, so a missing rule in the
chart, or one tenant's identity reaching another tenant's objects, fails a test instead of a
cluster. The attacks are made through the real kubernetes client, with the kubeconfig a pod of that
ServiceAccount would have (kubectl sends no token over the emulator's plain http: it stays the
administrator's tool here)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import yaml

from k8s import Cluster

PJ = {"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob",
      "spec": {"model": {"source": "demo"}, "target": {"ratio": 0.3}}}


@pytest.fixture()
def cluster(tmp_path):
    with Cluster(tmp_path / "cluster") as cluster:
        for ns in ("team-a", "team-b"):
            cluster.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            cluster.create({**PJ, "metadata": {"name": f"pj-{ns}"}}, namespace=ns)
            cluster.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"},
                            "stringData": {"key": f"secret-of-{ns}"}}, namespace=ns)
        # team-a's controller may read its PruneJobs and write their status, and make Jobs; nothing else
        cluster.create({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                        "metadata": {"name": "controller"}, "rules": [
                            {"apiGroups": ["selfpruner.io"], "resources": ["prunejobs"], "verbs": ["get", "list"]},
                            {"apiGroups": ["selfpruner.io"], "resources": ["prunejobs/status"], "verbs": ["patch"]},
                            {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get"]}]},
                       namespace="team-a")
        cluster.create({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                        "metadata": {"name": "controller"},
                        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "controller"},
                        "subjects": [{"kind": "ServiceAccount", "name": "controller", "namespace": "team-a"}]},
                       namespace="team-a")
        yield cluster
        assert not cluster.emulator.server_errors, cluster.emulator.server_errors[-1]


def client_as(cluster, namespace, account):
    """The kubernetes client's CustomObjectsApi, CoreV1Api and BatchV1Api as a pod of `account` has them."""
    import kubernetes

    api = kubernetes.config.new_client_from_config(str(cluster.kubeconfig_as(namespace, account)))
    return kubernetes.client.CustomObjectsApi(api), kubernetes.client.CoreV1Api(api), kubernetes.client.BatchV1Api(api)


def refused(call, *args, **kwargs):
    import kubernetes

    with pytest.raises(kubernetes.client.ApiException) as err:
        call(*args, **kwargs)
    err.value.message = json.loads(err.value.body)["message"]
    return err.value


def test_what_a_role_grants_is_allowed_in_its_namespace(cluster):
    custom, _, batch = client_as(cluster, "team-a", "controller")
    got = custom.get_namespaced_custom_object("selfpruner.io", "v1alpha1", "team-a", "prunejobs", "pj-team-a")
    assert got["metadata"]["name"] == "pj-team-a"
    custom.patch_namespaced_custom_object_status("selfpruner.io", "v1alpha1", "team-a", "prunejobs", "pj-team-a",
                                                 {"status": {"phase": "Running"}})
    assert cluster.get("prunejobs", "pj-team-a", namespace="team-a")["status"]["phase"] == "Running"
    listed = custom.list_namespaced_custom_object("selfpruner.io", "v1alpha1", "team-a", "prunejobs")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["pj-team-a"]


def test_tenant_a_cannot_read_or_write_tenant_b(cluster):
    """Tenant A's controller tries tenant B's PruneJob, its status and its Secret: all refused, with
    the server's message, and nothing of B's changed."""
    custom, core, batch = client_as(cluster, "team-a", "controller")
    err = refused(custom.get_namespaced_custom_object, "selfpruner.io", "v1alpha1", "team-b", "prunejobs", "pj-team-b")
    assert err.status == 403
    assert ('prunejobs.selfpruner.io "pj-team-b" is forbidden: User "system:serviceaccount:team-a:controller" '
            'cannot get resource "prunejobs" in API group "selfpruner.io" in the namespace "team-b"') in err.message
    err = refused(custom.patch_namespaced_custom_object_status, "selfpruner.io", "v1alpha1", "team-b", "prunejobs",
                  "pj-team-b", {"status": {"phase": "Failed"}})
    assert err.status == 403 and 'cannot patch resource "prunejobs/status"' in err.message
    assert "status" not in cluster.get("prunejobs", "pj-team-b", namespace="team-b")
    err = refused(core.read_namespaced_secret, "s3", "team-b")
    assert err.status == 403 and "secret-of-team-b" not in err.message


def test_what_no_rule_grants_is_refused_even_in_the_own_namespace(cluster):
    """Not granted: the namespace's Secrets, listing Jobs (only create and get), deleting a PruneJob,
    patching the PruneJob itself (only its status)."""
    custom, core, batch = client_as(cluster, "team-a", "controller")
    assert refused(core.read_namespaced_secret, "s3", "team-a").status == 403
    err = refused(batch.list_namespaced_job, "team-a")
    assert err.status == 403 and 'jobs.batch is forbidden: User "system:serviceaccount:team-a:controller" cannot ' \
                                 'list resource "jobs" in API group "batch" in the namespace "team-a"' in err.message
    assert refused(custom.delete_namespaced_custom_object, "selfpruner.io", "v1alpha1", "team-a", "prunejobs",
                   "pj-team-a").status == 403
    assert refused(custom.patch_namespaced_custom_object, "selfpruner.io", "v1alpha1", "team-a", "prunejobs",
                   "pj-team-a", {"spec": {"suspend": True}}).status == 403
    # another ServiceAccount of the same namespace has none of it
    other, _, _ = client_as(cluster, "team-a", "default")
    assert refused(other.get_namespaced_custom_object, "selfpruner.io", "v1alpha1", "team-a", "prunejobs",
                   "pj-team-a").status == 403


def test_cluster_roles_bind_everywhere_or_per_namespace_and_aggregate(cluster):
    """A ClusterRoleBinding grants in every namespace, a RoleBinding of a ClusterRole in its own only;
    an aggregated ClusterRole holds the rules of the ClusterRoles its selector picks."""
    cluster.create({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                    "metadata": {"name": "pj-reader", "labels": {"example.com/aggregate-to-view": "true"}},
                    "rules": [{"apiGroups": ["selfpruner.io"], "resources": ["prunejobs"], "verbs": ["get"]}]})
    cluster.create({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "view"},
                    "aggregationRule": {"clusterRoleSelectors": [
                        {"matchLabels": {"example.com/aggregate-to-view": "true"}}]}})
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "view"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
               "subjects": [{"kind": "ServiceAccount", "name": "viewer", "namespace": "team-b"}]}
    cluster.create(binding, namespace="team-b")
    viewer, _, _ = client_as(cluster, "team-b", "viewer")
    assert viewer.get_namespaced_custom_object("selfpruner.io", "v1alpha1", "team-b", "prunejobs", "pj-team-b")
    assert refused(viewer.get_namespaced_custom_object, "selfpruner.io", "v1alpha1", "team-a", "prunejobs",
                   "pj-team-a").status == 403
    cluster.create({**binding, "kind": "ClusterRoleBinding", "metadata": {"name": "view-all"}})
    assert viewer.get_namespaced_custom_object("selfpruner.io", "v1alpha1", "team-a", "prunejobs", "pj-team-a")


def test_a_token_nobody_issued_is_unauthorized_and_discovery_is_open(cluster):
    """An invented token is 401 on every path; an issued one reads discovery (system:discovery)."""
    def get(path, token):
        req = urllib.request.Request(cluster.url + path, headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code
    token = yaml.safe_load(cluster.kubeconfig_as("team-a", "controller").read_text())["users"][0]["user"]["token"]
    assert get("/apis/selfpruner.io/v1alpha1", token) == 200 and get("/api/v1", token) == 200
    assert get("/apis/selfpruner.io/v1alpha1/namespaces/team-a/prunejobs", token) == 200
    assert get("/api/v1/namespaces/team-a/secrets", token) == 403
    for path in ("/apis/selfpruner.io/v1alpha1", "/apis/selfpruner.io/v1alpha1/namespaces/team-a/prunejobs"):
        assert get(path, "forged") == 401


def test_requests_without_a_token_are_the_administrators(cluster):
    """The test's own helpers send no token: they set the world up, as kubectl with an admin
    kubeconfig would."""
    assert cluster.get("secrets", "s3", namespace="team-b")["data"]["key"]
    cluster.patch("prunejobs", "pj-team-b", {"status": {"phase": "Pending"}}, namespace="team-b", subresource="status")


PROBE = """
import sys, kubernetes
kubernetes.config.load_kube_config()
try:
    kubernetes.client.CustomObjectsApi().get_namespaced_custom_object(
        "selfpruner.io", "v1alpha1", "team-a", "prunejobs", "pj-team-a")
    code = 200
except kubernetes.client.ApiException as e:
    code = e.status
open(sys.argv[1], "w").write(str(code))
"""


def test_a_pod_acts_as_its_service_account_unless_no_token_is_mounted(cluster, tmp_path):
    """The kubelet gives each pod its ServiceAccount's token; `automountServiceAccountToken: false`
    on the pod, or on its ServiceAccount when the pod does not say, leaves it none (anonymous)."""
    import sys

    from k8s import Kubelet

    cluster.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "controller"},
                    "automountServiceAccountToken": False}, namespace="team-a")
    cases = {"pod-says-yes": True, "account-says-no": None, "pod-says-no": False}
    with Kubelet(cluster, command_map=lambda argv: [sys.executable, *argv[1:]], logs_dir=tmp_path / "pods",
                 service_account_tokens=True) as kubelet:
        for name, mount in cases.items():
            pod = {"restartPolicy": "Never", "serviceAccountName": "controller", "containers": [
                {"name": "probe", "image": "python", "command": ["python", "-c", PROBE, str(tmp_path / name)]}]}
            if mount is not None:
                pod["automountServiceAccountToken"] = mount
            cluster.create({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
                            "spec": {"backoffLimit": 0, "template": {"spec": pod}}}, namespace="team-a")
        for name in cases:
            kubelet.wait_finished(name, namespace="team-a")
    assert {name: (tmp_path / name).read_text() for name in cases} == {
        "pod-says-yes": "200", "account-says-no": "403", "pod-says-no": "403"}
