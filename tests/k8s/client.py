"""`Cluster`: the API server running in a thread, a kubeconfig for it, kubectl, and plain HTTP helpers."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import kmock
import yaml

from .apiserver import PRUNEJOB_CRD, REPO, ClusterEmulator
from .rbac import User

def find_kubectl() -> str | None:
    """tools/bin/kubectl (built by `make tools/bin/kubectl`), else a real kubectl on PATH."""
    local = REPO / "tools" / "bin" / "kubectl"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("kubectl")
    if found and "google-cloud-sdk" not in os.path.realpath(found):  # gcloud's is a dispatcher
        return found
    return found


class Cluster:
    """The emulated API server on http://127.0.0.1:PORT in a background thread, a kubeconfig for it,
    and helpers. Use as a context manager (or call start()/stop() from a fixture)."""

    def __init__(self, workdir: str | os.PathLike[str] | None = None, *,
                 crds: Iterable[str | os.PathLike[str]] = (PRUNEJOB_CRD,), namespace: str = "default"):
        import tempfile
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="cluster-")
        self.workdir = pathlib.Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.namespace = namespace
        self.crds = [pathlib.Path(c) for c in crds]
        self.kubeconfig = self.workdir / "kubeconfig"
        self.emulator: ClusterEmulator | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port: int | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self.kubectl_bin = find_kubectl()

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> "Cluster":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> "Cluster":
        self._thread = threading.Thread(target=self._run, name="kmock-apiserver", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the emulated API server did not start in 30 s")
        if self._failure is not None:
            raise RuntimeError("the emulated API server failed to start") from self._failure
        self._write_kubeconfig()
        return self

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:
                pass
        if self._thread is not None:
            self._thread.join(15)
        if self._tmp is not None:
            self._tmp.cleanup()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # noqa: BLE001 - reported through start()
            self._failure = e
            self._ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        emulator = ClusterEmulator()
        emulator.changed = asyncio.Condition()
        emulator.resources.load_bundled()
        self.emulator = emulator
        async with emulator:
            async with kmock.Server(emulator, host="127.0.0.1", user_agent="") as server:
                self.port = server.port
                await emulator.seed(kmock.resource("", "v1", "namespaces"),
                                    {"metadata": {"name": self.namespace}})
                if self.namespace != "kube-system":
                    await emulator.seed(kmock.resource("", "v1", "namespaces"), {"metadata": {"name": "kube-system"}})
                for path in self.crds:
                    for doc in yaml.safe_load_all(pathlib.Path(path).read_text()):
                        if doc:  # as if `kubectl apply`-ed: later applies do not warn
                            doc.setdefault("metadata", {}).setdefault("annotations", {})[
                                "kubectl.kubernetes.io/last-applied-configuration"] = json.dumps(doc)
                            await emulator.seed(ClusterEmulator._crd_res(), doc)
                self._ready.set()
                await self._stop.wait()
                emulator.closing = True
                async with emulator.changed:
                    emulator.changed.notify_all()
                await asyncio.sleep(0.05)

    @property
    def faults(self) -> Any:
        """The emulator's injectable faults (k8s/faults.py), e.g.
        `cluster.faults.add(code=503, method="PATCH", path_regex=r"/prunejobs/", times=2)`."""
        assert self.emulator is not None, "start the cluster first"
        return self.emulator.faults

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_kubeconfig(self, path: pathlib.Path | None = None, user: str = "tester",
                          credentials: dict[str, str] | None = None, namespace: str | None = None) -> pathlib.Path:
        """A kubeconfig for this server; by default the administrator's (no token), at `kubeconfig`."""
        path = path or self.kubeconfig
        config = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "emulated", "cluster": {"server": self.url}}],
            "users": [{"name": user, "user": credentials or {"username": "tester", "password": "tester"}}],
            "contexts": [{"name": "emulated", "context": {"cluster": "emulated", "user": user,
                                                          "namespace": namespace or self.namespace}}],
            "current-context": "emulated",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def kubeconfig_as(self, namespace: str, service_account: str) -> pathlib.Path:
        """A kubeconfig whose requests act as a ServiceAccount: a bearer token the emulator maps
        to `system:serviceaccount:<namespace>:<name>`, which RBAC then limits to what is bound to it
        (as a pod's mounted token does on a real cluster). The ServiceAccount need not exist."""
        return self.kubeconfig_for(User.service_account(namespace, service_account), namespace)

    def kubeconfig_for(self, user: User, namespace: str) -> pathlib.Path:
        """A kubeconfig with a token for `user` (`User.anonymous()`: what a pod without a mounted
        token amounts to, an identity RBAC grants nothing)."""
        assert self.emulator is not None, "start the cluster first"
        token = self.emulator.tokens.issue(user)
        name = user.name.rpartition(":")[2]
        return self._write_kubeconfig(self.workdir / f"kubeconfig-{namespace}-{name}-{token[:6]}", name,
                                      {"token": token}, namespace)

    def env_as(self, namespace: str, service_account: str | None) -> dict[str, str]:
        """`env`, with the kubeconfig of `kubeconfig_as` (None: anonymous, a pod without a token)."""
        path = self.kubeconfig_as(namespace, service_account) if service_account is not None \
            else self.kubeconfig_for(User.anonymous(), namespace)
        return {**self.env, "KUBECONFIG": str(path)}

    @property
    def env(self) -> dict[str, str]:
        """os.environ with KUBECONFIG pointing here (set it before importing kubernetes or kopf)."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env.pop("KUBERNETES_SERVICE_HOST", None)
        env.pop("KUBERNETES_SERVICE_PORT", None)
        return env

    # -- kubectl -------------------------------------------------------------------------------

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        if not self.kubectl_bin:
            raise RuntimeError("no kubectl: run `make tools/bin/kubectl`")
        argv = [self.kubectl_bin, f"--kubeconfig={self.kubeconfig}", "--request-timeout=20s", *args]
        if args and args[0] in ("apply", "create", "replace") and not any(a.startswith("--validate") for a in args):
            argv.append("--validate=false")
        env = self.env
        env["KUBECACHEDIR"] = str(self.workdir / "kube-cache")   # no stale discovery between clusters
        proc = subprocess.run(argv, capture_output=True, text=True, input=input, env=env, timeout=timeout)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    # -- plain HTTP helpers (thread-safe: they go through the server) ----------------------------

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                params: Mapping[str, str] | None = None) -> Any:
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            payload = e.read()
            try:
                status = json.loads(payload)
            except ValueError:
                status = {"message": payload.decode(errors="replace")}
            raise ClusterApiError(e.code, status) from None

    def resolve(self, what: str) -> tuple[kmock.resource, bool]:
        """'prunejobs', 'PruneJob', 'pj', 'jobs.batch', 'prunejobs.selfpruner.io' -> (resource, namespaced)."""
        assert self.emulator is not None
        name, _, group = what.partition(".")
        for _ in range(5):
            try:
                candidates = [(r, self.emulator.resources[r]) for r in list(self.emulator.resources)]
                break
            except RuntimeError:  # the dict changed under us (a CRD was applied); retry
                time.sleep(0.01)
        else:
            raise RuntimeError("could not read the resources")
        matches = []
        for r, info in candidates:
            if group and r.group != group and not r.group.startswith(group + "."):
                continue
            names = {r.plural, (info.kind or "").lower(), (info.singular or "").lower(), *info.shortnames}
            if name.lower() in names or name == info.kind:
                matches.append((r, bool(info.namespaced)))
        if not matches:
            raise KeyError(f"unknown resource {what!r}")
        preferred = {"": 0, "batch": 1, "apps": 2, "selfpruner.io": 0}
        matches.sort(key=lambda m: (preferred.get(m[0].group, 5), m[0].group, m[0].version))
        return matches[0]

    def path(self, what: str, name: str | None = None, namespace: str | None = None,
             subresource: str | None = None) -> str:
        res, namespaced = self.resolve(what)
        base = f"/api/{res.version}" if res.group == "" else f"/apis/{res.group}/{res.version}"
        if namespaced and namespace != "*":
            base += f"/namespaces/{namespace or self.namespace}"
        base += f"/{res.plural}"
        if name:
            base += f"/{name}"
        if subresource:
            base += f"/{subresource}"
        return base

    def get(self, what: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """The object, or None if it does not exist."""
        try:
            return self.request("GET", self.path(what, name, namespace))
        except ClusterApiError as e:
            if e.code == 404:
                return None
            raise

    def list(self, what: str, namespace: str | None = None, labels: str | None = None,
             fields: str | None = None) -> list[dict[str, Any]]:
        """Items of a kind; namespace='*' for all namespaces."""
        params = {k: v for k, v in (("labelSelector", labels), ("fieldSelector", fields)) if v}
        return self.request("GET", self.path(what, None, namespace), params=params)["items"]

    def create(self, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        what = f"{body['kind']}.{body['apiVersion'].rsplit('/', 1)[0]}" if "/" in body["apiVersion"] else body["kind"]
        ns = namespace or body.get("metadata", {}).get("namespace")
        return self.request("POST", self.path(what, None, ns), body)

    def patch(self, what: str, name: str, patch: Any, namespace: str | None = None,
              subresource: str | None = None, content_type: str = "application/merge-patch+json") -> dict[str, Any]:
        return self.request("PATCH", self.path(what, name, namespace, subresource), patch, content_type)

    def delete(self, what: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        try:
            return self.request("DELETE", self.path(what, name, namespace))
        except ClusterApiError as e:
            if e.code == 404:
                return None
            raise

    def events(self, name: str | None = None, namespace: str | None = None,
               kind: str | None = None) -> list[dict[str, Any]]:
        """core/v1 Events (kopf posts these), optionally about one object (involvedObject.name)."""
        items = self.list("events", namespace)
        return [e for e in items
                if (name is None or e.get("involvedObject", {}).get("name") == name)
                and (kind is None or e.get("involvedObject", {}).get("kind") == kind)]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 20, interval: float = 0.05,
                 message: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {message}")
            time.sleep(interval)


class ClusterApiError(Exception):
    def __init__(self, code: int, status: dict[str, Any]):
        super().__init__(f"{code} {status.get('reason', '')}: {status.get('message', '')}")
        self.code, self.status = code, status


# ---------------------------------------------------------------------------------------------
# The kubelet + Job controller
# ---------------------------------------------------------------------------------------------
