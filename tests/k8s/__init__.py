"""A test-side Kubernetes "cluster": kmock's emulator made strict enough for kopf, kubectl and
the `kubernetes` client, plus a fake kubelet/Job controller that runs Jobs as local processes.

    with Cluster() as cluster, Kubelet(cluster, command_map=...) as kubelet:
        cluster.kubectl("apply", "-f", "crds/prunejob.yaml")
        subprocess.Popen(["kopf", "run", "--standalone", ...], env=cluster.env)
        ...

See tests/README.md for what it emulates and, more importantly, what it does not.

kmock 0.8's KubernetesEmulator is an in-memory "merge the dicts" store. The subclass below
(`ClusterEmulator`) keeps kmock's HTTP server, discovery endpoints, error rendering and its
``objects`` array (kept in sync for assertions), but serves every request on a Kubernetes
resource itself, with the API server's semantics that kopf, kubectl and a Job controller rely
on: uid/resourceVersion/creationTimestamp/generation, 201 on create, 409/422 errors, status
subresources, JSON/merge/strategic-merge patches, label & field selectors, ``kind: XList``,
resumable watch streams with bookmarks, CRDs that declare their resource, cascading deletion of
owned objects, and a capped request history.

One module each: `apiserver` (the emulator), `client` (`Cluster`: the server in a thread, kubectl,
HTTP helpers), `jobcontroller` (batch/v1 Job semantics), `kubelet` (pods as local processes),
and the `patches` and `selectors` they share.
"""

from .client import Cluster, ClusterApiError, find_kubectl
from .kubelet import Kubelet

__all__ = ["Cluster", "ClusterApiError", "Kubelet", "find_kubectl"]
