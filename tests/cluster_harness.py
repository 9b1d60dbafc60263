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
"""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import datetime
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import aiohttp.web
import kmock
import yaml
from kmock._internal import enums, rendering

REPO = pathlib.Path(__file__).resolve().parent.parent
PRUNEJOB_CRD = REPO / "crds" / "prunejob.yaml"
MAX_REQUEST_HISTORY = 200     # kmock re-checks its whole request history on each request
MAX_EVENT_LOG = 20_000        # watch events kept for resuming watches by resourceVersion
BOOKMARK_INTERVAL = 5.0       # seconds between watch bookmarks (kopf's inactivity timeout is 70 s)


def find_kubectl() -> str | None:
    """tools/bin/kubectl (built by `make tools/bin/kubectl`), else a real kubectl on PATH."""
    local = REPO / "tools" / "bin" / "kubectl"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("kubectl")
    if found and "google-cloud-sdk" not in os.path.realpath(found):  # gcloud's is a dispatcher
        return found
    return found


def _now() -> str:
    return datetime.datetime.now(tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age(timestamp: str | None) -> str:
    if not timestamp:
        return "<unknown>"
    try:
        then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return "<unknown>"
    secs = int((datetime.datetime.now(tz=datetime.timezone.utc) - then).total_seconds())
    if secs < 120:
        return f"{max(secs, 0)}s"
    if secs < 7200:
        return f"{secs // 60}m"
    return f"{secs // 3600}h"


# ---------------------------------------------------------------------------------------------
# Patching (RFC 6902 JSON patch, RFC 7386 merge patch, an approximation of strategic merge)
# ---------------------------------------------------------------------------------------------

class PatchError(Exception):
    pass


class PatchTestFailed(PatchError):
    pass


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(doc, dict):
            if part not in doc:
                raise PatchError(f"path not found: {part!r}")
            doc = doc[part]
        elif isinstance(doc, list):
            try:
                doc = doc[int(part)]
            except (ValueError, IndexError):
                raise PatchError(f"bad list index {part!r}") from None
        else:
            raise PatchError(f"cannot descend into {type(doc).__name__}")
    return doc


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        parts = _pointer(path)
        if kind == "test":
            try:
                actual = _walk(doc, parts)
            except PatchError:
                raise PatchTestFailed(f"test failed: {path} does not exist") from None
            if actual != op.get("value"):
                raise PatchTestFailed(f"test failed: {path} is {actual!r}, not {op.get('value')!r}")
            continue
        if kind in ("move", "copy"):
            src = _pointer(op["from"])
            value = copy.deepcopy(_walk(doc, src))
            if kind == "move":
                doc = json_patch(doc, [{"op": "remove", "path": op["from"]}])
            doc = json_patch(doc, [{"op": "add", "path": path, "value": value}])
            continue
        if not parts:
            if kind in ("add", "replace"):
                doc = copy.deepcopy(op["value"])
                continue
            raise PatchError("cannot remove the root")
        parent = _walk(doc, parts[:-1])
        last = parts[-1]
        if isinstance(parent, dict):
            if kind == "add":
                parent[last] = copy.deepcopy(op["value"])
            elif kind == "replace":
                if last not in parent:
                    raise PatchError(f"replace: {path} does not exist")
                parent[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                if last not in parent:
                    raise PatchError(f"remove: {path} does not exist")
                del parent[last]
            else:
                raise PatchError(f"unknown op {kind!r}")
        elif isinstance(parent, list):
            if kind == "add":
                idx = len(parent) if last == "-" else int(last)
                if not 0 <= idx <= len(parent):
                    raise PatchError(f"add: index {idx} out of range")
                parent.insert(idx, copy.deepcopy(op["value"]))
            elif kind in ("replace", "remove"):
                try:
                    idx = int(last)
                    parent[idx]
                except (ValueError, IndexError):
                    raise PatchError(f"{kind}: bad index {last!r}") from None
                if kind == "replace":
                    parent[idx] = copy.deepcopy(op["value"])
                else:
                    del parent[idx]
            else:
                raise PatchError(f"unknown op {kind!r}")
        else:
            raise PatchError(f"cannot patch inside {type(parent).__name__}")
    return doc


def merge_patch(target: Any, patch: Any, strategic: bool = False) -> Any:
    """RFC 7386; with ``strategic``, `$`-directives of kubectl's strategic merge patches are
    dropped and lists are replaced whole (no patchMergeKey merging: a documented limitation)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(_strip_directives(patch) if strategic else patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if strategic and key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value, strategic)
    return result


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value
                if not (isinstance(v, dict) and "$patch" in v)]
    return value


# ---------------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------------

_SET_RE = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(selector: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def match_labels(selector: str | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes label selector: =, ==, !=, `key`, `!key`, `key in (a,b)`, `key notin (a,b)`."""
    if not selector:
        return True
    for term in _split_selector(selector):
        m = _SET_RE.match(term)
        if m:
            key, op, vals = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            if op == "in" and labels.get(key) not in vals:
                return False
            if op == "notin" and key in labels and labels[key] in vals:
                return False
        elif "!=" in term:
            key, val = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == val:
                return False
        elif "==" in term or "=" in term:
            key, val = (s.strip() for s in re.split(r"==?", term, maxsplit=1))
            if labels.get(key) != val:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def match_fields(selector: str | None, obj: Mapping[str, Any]) -> bool:
    """Field selectors: equality/inequality on dotted paths (metadata.name, status.phase...)."""
    if not selector:
        return True
    for term in _split_selector(selector):
        negate = "!=" in term
        key, val = (s.strip() for s in re.split(r"!=|==?", term, maxsplit=1))
        cur: Any = obj
        for part in key.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        actual = "" if cur is None else str(cur).lower() if isinstance(cur, bool) else str(cur)
        if (actual == val) == negate:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# The API server
# ---------------------------------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict[str, Any]:
        body = {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            body["details"] = self.details
        return body


Key = tuple[kmock.resource, "str | None", str]

CORE_EVENTS = kmock.resource("", "v1", "events")
NEW_EVENTS = kmock.resource("events.k8s.io", "v1", "events")


def event_to_new(core: dict[str, Any]) -> dict[str, Any]:
    """A core/v1 Event as events.k8s.io/v1 shows it (one storage, two schemas, as in Kubernetes)."""
    out = {"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": copy.deepcopy(core.get("metadata", {})),
           "regarding": core.get("involvedObject"), "note": core.get("message"), "reason": core.get("reason"),
           "type": core.get("type"), "action": core.get("action"), "eventTime": core.get("eventTime"),
           "deprecatedFirstTimestamp": core.get("firstTimestamp"),
           "deprecatedLastTimestamp": core.get("lastTimestamp"), "deprecatedCount": core.get("count"),
           "reportingController": core.get("reportingComponent") or (core.get("source") or {}).get("component"),
           "reportingInstance": core.get("reportingInstance")}
    return {k: v for k, v in out.items() if v is not None}


def event_to_core(new: dict[str, Any]) -> dict[str, Any]:
    out = {"apiVersion": "v1", "kind": "Event", "metadata": copy.deepcopy(new.get("metadata", {})),
           "involvedObject": new.get("regarding") or {}, "message": new.get("note"), "reason": new.get("reason"),
           "type": new.get("type"), "action": new.get("action"), "eventTime": new.get("eventTime"),
           "firstTimestamp": new.get("deprecatedFirstTimestamp"), "lastTimestamp": new.get("deprecatedLastTimestamp"),
           "count": new.get("deprecatedCount"), "reportingComponent": new.get("reportingController"),
           "reportingInstance": new.get("reportingInstance")}
    return {k: v for k, v in out.items() if v is not None}


EVENT_COLUMNS = [
    {"name": "Last Seen", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Type", "type": "string", "jsonPath": ".type"},
    {"name": "Reason", "type": "string", "jsonPath": ".reason"},
    {"name": "Object", "type": "string", "jsonPath": ".involvedObject.name"},
    {"name": "Message", "type": "string", "jsonPath": ".message"},
]


def _default_structural(schema: dict[str, Any], value: Any) -> Any:
    """The API server's defaulting of a custom resource: every absent property with a `default`
    gets it, recursing into objects (including a defaulted `{}`); `metadata` is left alone."""
    if not isinstance(value, dict) or schema.get("type") != "object":
        return value
    for key, sub in (schema.get("properties") or {}).items():
        if key == "metadata":
            continue
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        if key in value:
            _default_structural(sub, value[key])
    return value


class ClusterEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with the API-server semantics the operator tests need (see module doc).

    All state lives in the event loop of the server's thread; other threads talk HTTP to it.
    ``objects`` (kmock's array) mirrors the live objects for assertions.
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.store: dict[Key, dict[str, Any]] = {}
        self.rv = 0
        self.event_log: collections.deque[tuple[int, kmock.resource, str, dict[str, Any], Any]] = \
            collections.deque(maxlen=MAX_EVENT_LOG)
        self.changed: asyncio.Condition | None = None  # created inside the server's loop
        self.closing = False
        self.request_count = 0
        self.server_errors: list[str] = []     # tracebacks of 500s (a bug in the emulator)
        self.crd_resources: dict[str, list[kmock.resource]] = {}   # CRD name -> declared resources
        self.crd_schemas: dict[kmock.resource, dict[str, Any]] = {}  # its openAPIV3Schema, for defaulting
        self.printer_columns: dict[kmock.resource, list[dict[str, Any]]] = {}

    # -- plumbing ------------------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Replaces kmock's entry point: kmock's path parser fails on `/api/v1/namespaces`
        and `/api/v1/namespaces/NAME` (500), and kmock keeps every request forever."""
        await raw_request.read()
        self.request_count += 1
        try:
            request = await self._parse(raw_request)
            self._requests.append(request)
            if len(self._requests) > MAX_REQUEST_HISTORY:     # cap the history (kmock walks it all)
                del self._requests[:-MAX_REQUEST_HISTORY // 2]
            for payload in self._payloads:
                if len(payload._requests) > MAX_REQUEST_HISTORY:
                    del payload._requests[:-MAX_REQUEST_HISTORY // 2]
            if request.resource is None or request.resource.plural is None:
                return await kmock.RawHandler._handle(self, request)   # discovery & co: kmock's DSL
            return await self._serve(request)
        except ApiError as e:
            return aiohttp.web.json_response(e.status(), status=e.code)
        except kmock.KubernetesError as e:   # kmock's 404s for unknown endpoints (e.g. /openapi/v3)
            return aiohttp.web.json_response(ApiError(e.status, "NotFound" if e.status == 404 else (e.reason or ""),
                                                      e.message or "").status(), status=e.status)
        except Exception as e:  # noqa: BLE001 - a 500 with the traceback, as kmock does
            self.server_errors.append(traceback.format_exc())
            del self.server_errors[:-50]
            return await self._render_error(e)

    @staticmethod
    async def _parse(raw: aiohttp.web.BaseRequest) -> rendering.Request:
        body = await raw.read()
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        parts = [p for p in raw.path.strip("/").split("/") if p]
        group = version = plural = namespace = name = None
        sub = None
        rest: list[str] = []
        if len(parts) >= 2 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        elif len(parts) == 2 and parts[0] == "apis":
            group = parts[1]
        if group is not None and rest:
            if rest[0] == "namespaces" and (len(rest) <= 2 or rest[2] in ("status", "finalize")):
                plural, name, sub = "namespaces", (rest[1] if len(rest) > 1 else None), \
                    (rest[2] if len(rest) > 2 else None)
            elif rest[0] == "namespaces":
                namespace, plural = rest[1], rest[2]
                name = rest[3] if len(rest) > 3 else None
                sub = "/".join(rest[4:]) or None
            else:
                plural = rest[0]
                name = rest[1] if len(rest) > 1 else None
                sub = "/".join(rest[2:]) or None
        resource = None if group is None else kmock.resource(group, version, plural) if plural else \
            kmock.resource(group=group, version=version)
        method = enums.method(raw.method)
        query = dict(raw.query)
        action = None
        if group is not None:
            if method == enums.method.GET and query.get("watch", "").lower() in ("true", "1"):
                action = enums.action.WATCH
            elif name is None:
                action = enums.action.LIST if method == enums.method.GET else \
                    enums.action.CREATE if method == enums.method.POST else None
            else:
                action = {enums.method.GET: enums.action.FETCH, enums.method.PATCH: enums.action.UPDATE,
                          enums.method.DELETE: enums.action.DELETE}.get(method)
        return rendering.Request(
            raw_request=raw, url=raw.url, method=raw.method, params=dict(raw.query), headers=dict(raw.headers),
            cookies=dict(raw.cookies), data=data, body=body, text=body.decode("utf-8", "replace"),
            action=action, resource=resource, namespace=namespace, name=name, subresource=sub)

    def _info(self, res: kmock.resource) -> Any:
        if res not in self.resources:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({res.plural})")
        return self.resources[res]

    def _kind(self, res: kmock.resource) -> str:
        info = self.resources[res]
        return info.kind or res.plural.capitalize()

    @staticmethod
    def _api_version(res: kmock.resource) -> str:
        return f"{res.group}/{res.version}" if res.group else res.version

    def _next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    async def _emit(self, res: kmock.resource, etype: str, obj: dict[str, Any],
                    old: dict[str, Any] | None = None) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        self.event_log.append((rv, res, etype, copy.deepcopy(obj), old))
        assert self.changed is not None
        async with self.changed:
            self.changed.notify_all()

    def _mirror(self, key: Key, obj: dict[str, Any] | None) -> None:
        try:
            if obj is None:
                if key in self._objects:
                    del self._objects[key]
            else:
                self._objects[key] = copy.deepcopy(obj)
        except Exception:  # the mirror is a convenience; never break serving for it
            pass

    def _not_found(self, res: kmock.resource, name: str) -> ApiError:
        return ApiError(404, "NotFound", f'{res.plural}.{res.group} "{name}" not found'.replace(". \"", " \""),
                        {"name": name, "group": res.group, "kind": res.plural})

    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        """kmock lists subresources with the parent's short names and verbs (kubectl then warns
        that `pj` may mean `prunejobs/status`); list them as the API server does."""
        doc = await super()._serve_version(request)
        for entry in doc.get("resources", []):  # type: ignore[union-attr]
            if "/" in entry["name"]:
                entry.update(shortNames=[], categories=[], singularName="", verbs=["get", "patch", "update"])
        return doc

    # -- dispatch ------------------------------------------------------------------------------

    async def _serve(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        res = request.resource
        assert res is not None
        info = self._info(res)
        method = str(request.method.value if hasattr(request.method, "value") else request.method).upper()
        ns = request.namespace if info.namespaced else None
        name, sub = request.name, request.subresource
        params = request.params
        if res == NEW_EVENTS:   # events.k8s.io/v1 is a view of the core/v1 Events (kubectl reads it)
            if method == "POST" and name is None:
                return self._json(event_to_new(await self._create(CORE_EVENTS, ns, event_to_core(
                    self._body(request)))), 201)
            if method == "DELETE" and name is not None:
                return self._json(event_to_new(await self._delete(CORE_EVENTS, ns, name, "Background", None)))
            if method != "GET" or params.get("watch", "").lower() in ("true", "1"):
                raise ApiError(405, "MethodNotAllowed", "events.k8s.io/v1 is read-only here (no watch): "
                                                        "use core/v1 events")
            if name is not None:
                return self._json(event_to_new(self._get(CORE_EVENTS, ns, name)))
            listing = self._list(request, CORE_EVENTS, ns)
            if listing["kind"] != "Table":
                listing.update(apiVersion="events.k8s.io/v1", items=[event_to_new(i) for i in listing["items"]])
            return self._json(listing)
        if sub not in (None, "status"):
            raise ApiError(404, "NotFound", f"subresource {sub!r} is not served by the emulator")
        if sub == "status" and "status" not in info.subresources:
            raise ApiError(404, "NotFound", f"{res.plural} have no status subresource")

        if method == "GET" and params.get("watch", "").lower() in ("true", "1"):
            return await self._watch(request, res, ns, name)
        if method == "GET" and name is None:
            return self._json(self._list(request, res, ns))
        if method == "GET":
            return self._json(self._get(res, ns, name))
        if method == "POST" and name is None:
            body = self._body(request)
            return self._json(await self._create(res, ns, body), 201)
        if method in ("PATCH", "PUT") and name is not None:
            body = self._body(request)
            ctype = request.headers.get("Content-Type", "application/json").split(";")[0].strip()
            obj, code = await self._update(res, ns, name, sub, body, ctype, method == "PUT")
            return self._json(obj, code)
        if method == "DELETE" and name is not None:
            body = self._body(request, allow_empty=True) or {}
            policy = body.get("propagationPolicy") or params.get("propagationPolicy") or "Background"
            return self._json(await self._delete(res, ns, name, policy, body.get("preconditions")))
        if method == "DELETE":
            labels, fields = params.get("labelSelector"), params.get("fieldSelector")
            gone = []
            for (r, n, nm), obj in list(self.store.items()):
                if r == res and (ns is None or n == ns) and match_labels(labels, obj["metadata"].get("labels") or {}) \
                        and match_fields(fields, obj):
                    gone.append(await self._delete(res, n, nm, "Background", None))
            return self._json({"apiVersion": self._api_version(res), "kind": f"{self._kind(res)}List",
                               "metadata": {"resourceVersion": str(self.rv)}, "items": gone})
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")

    @staticmethod
    def _json(obj: Any, code: int = 200) -> aiohttp.web.Response:
        return aiohttp.web.Response(text=json.dumps(obj), status=code, content_type="application/json")

    @staticmethod
    def _body(request: rendering.Request, allow_empty: bool = False) -> Any:
        raw = request.body or b""
        if not raw.strip():
            if allow_empty:
                return None
            raise ApiError(400, "BadRequest", "the request has no body")
        try:
            return json.loads(raw)
        except ValueError:
            try:
                return yaml.safe_load(raw)
            except yaml.YAMLError as e:
                raise ApiError(400, "BadRequest", f"cannot parse the body: {e}") from None

    # -- reads ---------------------------------------------------------------------------------

    def _get(self, res: kmock.resource, ns: str | None, name: str) -> dict[str, Any]:
        obj = self.store.get((res, ns, name))
        if obj is None:
            raise self._not_found(res, name)
        return obj

    def _select(self, request: rendering.Request, res: kmock.resource, ns: str | None,
                name: str | None = None) -> list[dict[str, Any]]:
        labels, fields = request.params.get("labelSelector"), request.params.get("fieldSelector")
        items = []
        for (r, n, nm), obj in self.store.items():
            if r != res or (ns is not None and n != ns) or (name is not None and nm != name):
                continue
            if match_labels(labels, obj["metadata"].get("labels") or {}) and match_fields(fields, obj):
                items.append(obj)
        items.sort(key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
        return items

    def _list(self, request: rendering.Request, res: kmock.resource, ns: str | None) -> dict[str, Any]:
        items = self._select(request, res, ns)
        accept = request.headers.get("Accept", "")
        if "as=Table" in accept:
            return self._table(res, items)
        return {"apiVersion": self._api_version(res), "kind": f"{self._kind(res)}List",
                "metadata": {"resourceVersion": str(self.rv)}, "items": items}

    def _table(self, res: kmock.resource, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Server-side printing for `kubectl get`, with a CRD's additionalPrinterColumns
        (simple `.a.b.c` JSON paths only)."""
        cols = [{"name": "Name", "type": "string", "format": "name", "description": "name", "priority": 0}]
        extra = self.printer_columns.get(res)
        if res == CORE_EVENTS:
            extra = EVENT_COLUMNS
        if extra is None:
            extra = [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
        for c in extra:
            cols.append({"name": c["name"], "type": c.get("type", "string"), "format": c.get("format", ""),
                         "description": c.get("description", ""), "priority": c.get("priority", 0)})
        rows = []
        for obj in items:
            cells: list[Any] = [obj["metadata"]["name"]]
            for c in extra:
                cur: Any = obj
                for part in c.get("jsonPath", "").strip(".").split("."):
                    cur = cur.get(part) if isinstance(cur, dict) else None
                if c.get("type") == "date":
                    cur = _age(cur)
                cells.append(cur)
            rows.append({"cells": cells, "object": {
                "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}})
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
                "metadata": {"resourceVersion": str(self.rv)}, "columnDefinitions": cols, "rows": rows}

    async def _watch(self, request: rendering.Request, res: kmock.resource, ns: str | None,
                     name: str | None) -> aiohttp.web.StreamResponse:
        params = request.params
        labels, fields = params.get("labelSelector"), params.get("fieldSelector")
        bookmarks = params.get("allowWatchBookmarks", "").lower() == "true"
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        since_raw = params.get("resourceVersion")
        send_initial = params.get("sendInitialEvents", "").lower() == "true"
        initial = send_initial or since_raw in (None, "", "0")

        def wanted(obj: dict[str, Any]) -> bool:
            meta = obj.get("metadata", {})
            return ((ns is None or meta.get("namespace") == ns) and (name is None or meta.get("name") == name)
                    and match_labels(labels, meta.get("labels") or {}) and match_fields(fields, obj))

        raw = request._raw_request
        assert raw is not None
        response = aiohttp.web.StreamResponse(status=200)
        response.content_type = "application/json"
        await response.prepare(raw)

        async def send(etype: str, obj: dict[str, Any]) -> None:
            await response.write(json.dumps({"type": etype, "object": obj}).encode() + b"\n")

        if initial:
            last = self.rv
            for obj in self._select(request, res, ns, name):
                await send("ADDED", obj)
            if send_initial:
                await send("BOOKMARK", {"kind": self._kind(res), "apiVersion": self._api_version(res),
                                        "metadata": {"resourceVersion": str(last),
                                                     "annotations": {"k8s.io/initial-events-end": "true"}}})
        else:
            try:
                last = int(since_raw)  # type: ignore[arg-type]
            except ValueError:
                last = self.rv
            oldest = self.event_log[0][0] if self.event_log else self.rv + 1
            if last < self.rv and last + 1 < oldest:
                await send("ERROR", {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 410,
                                     "reason": "Expired", "message": f"too old resource version: {last}"})
                await response.write_eof()
                return response

        deadline = time.monotonic() + timeout if timeout else None
        next_bookmark = time.monotonic() + BOOKMARK_INTERVAL
        assert self.changed is not None
        try:
            while not self.closing:
                top = self.rv
                fresh = []
                for rv, r, etype, obj, old in reversed(self.event_log):
                    if rv <= last:
                        break
                    if r != res:
                        continue
                    now_in, was_in = wanted(obj), old is not None and wanted(old)
                    if etype == "MODIFIED" and now_in != was_in:   # entered/left the selection
                        fresh.append(("ADDED" if now_in else "DELETED", obj))
                    elif now_in or (etype == "DELETED" and was_in):
                        fresh.append((etype, obj))
                last = top
                for etype, obj in reversed(fresh):
                    await send(etype, obj)
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                if bookmarks and now >= next_bookmark:
                    next_bookmark = now + BOOKMARK_INTERVAL
                    await send("BOOKMARK", {"kind": self._kind(res), "apiVersion": self._api_version(res),
                                            "metadata": {"resourceVersion": str(last)}})
                wait = BOOKMARK_INTERVAL if deadline is None else min(BOOKMARK_INTERVAL, deadline - now)
                async with self.changed:
                    if self.rv == last and not self.closing:   # nothing new arrived while sending
                        try:
                            await asyncio.wait_for(self.changed.wait(), timeout=max(wait, 0.01))
                        except asyncio.TimeoutError:
                            pass
        except (ConnectionResetError, aiohttp.ClientConnectionResetError, asyncio.CancelledError):
            return response
        try:
            await response.write_eof()
        except Exception:
            pass
        return response

    # -- writes --------------------------------------------------------------------------------

    def _stamp_new(self, res: kmock.resource, ns: str | None, body: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if meta.get("generateName"):
                suffix = "".join(uuid.uuid4().hex[i] for i in range(5))
                meta["name"] = meta["generateName"] + suffix
            else:
                raise ApiError(422, "Invalid", "metadata.name: Required value: name or generateName is required",
                               {"kind": self._kind(res)})
        if ns is not None:
            if meta.get("namespace") not in (None, ns):
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not match "
                                                  "the namespace sent on the request")
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        obj["apiVersion"] = self._api_version(res)
        obj["kind"] = self._kind(res)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        meta.pop("deletionTimestamp", None)
        meta.pop("resourceVersion", None)
        for k in ("labels", "annotations"):
            if k in meta and meta[k] is None:
                del meta[k]
        if res in self.crd_schemas:
            _default_structural(self.crd_schemas[res], obj)
        self._normalize(res, obj)
        return obj

    def _normalize(self, res: kmock.resource, obj: dict[str, Any]) -> None:
        if res.plural == "secrets" and res.group == "" and obj.get("stringData"):
            data = obj.setdefault("data", {}) or {}
            for k, v in obj.pop("stringData").items():
                data[k] = base64.b64encode(str(v).encode()).decode()
            obj["data"] = data
        if res.plural == "jobs" and res.group == "batch":
            spec = obj.setdefault("spec", {})
            spec.setdefault("completionMode", "NonIndexed")
            spec.setdefault("backoffLimit", 6 if spec.get("backoffLimitPerIndex") is None else 2147483647)
            spec.setdefault("suspend", False)
            if spec.get("completionMode") == "Indexed":
                spec.setdefault("completions", 1)
            spec.setdefault("parallelism", 1)
            labels = obj["metadata"].setdefault("labels", {})
            labels.setdefault("job-name", obj["metadata"]["name"])
        if res.plural == "namespaces" and res.group == "":
            obj.setdefault("status", {}).setdefault("phase", "Active")

    async def _create(self, res: kmock.resource, ns: str | None, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body must be an object")
        info = self._info(res)
        obj = self._stamp_new(res, ns, body)
        key = (res, ns, obj["metadata"]["name"])
        if key in self.store:
            raise ApiError(409, "AlreadyExists", f'{res.plural} "{key[2]}" already exists',
                           {"name": key[2], "group": res.group, "kind": res.plural})
        if "status" in info.subresources and res != self._crd_res():
            obj.pop("status", None)  # the main resource ignores status (as the real API server does)
        if res == self._crd_res():
            self._declare_crd(obj)
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self.store[key] = obj
        self._mirror(key, obj)
        await self._emit(res, "ADDED", obj)
        return obj

    async def _update(self, res: kmock.resource, ns: str | None, name: str, sub: str | None, body: Any,
                      ctype: str, replace: bool) -> tuple[dict[str, Any], int]:
        info = self._info(res)
        key = (res, ns, name)
        old = self.store.get(key)
        if old is None:
            if ctype == "application/apply-patch+yaml" and sub is None:   # server-side apply creates
                return await self._create(res, ns, body), 201
            raise self._not_found(res, name)
        if replace:
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "the body must be an object")
            new = copy.deepcopy(body)
            want_rv = (body.get("metadata") or {}).get("resourceVersion")
        elif ctype == "application/json-patch+json":
            if not isinstance(body, list):
                raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
            try:
                new = json_patch(old, body)
            except PatchTestFailed as e:
                raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: {e}",
                               {"name": name, "group": res.group, "kind": res.plural}) from None
            except (PatchError, KeyError, TypeError, ValueError) as e:
                raise ApiError(422, "Invalid", f"the JSON patch cannot be applied: {e}") from None
            want_rv = None
        else:
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "a merge patch must be an object")
            strategic = ctype in ("application/strategic-merge-patch+json", "application/apply-patch+yaml")
            new = merge_patch(old, body, strategic=strategic)
            want_rv = (body.get("metadata") or {}).get("resourceVersion")
        if want_rv and want_rv != old["metadata"].get("resourceVersion"):
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {res.plural} "{name}": the object has '
                                            "been modified; please apply your changes to the latest version and try again",
                           {"name": name, "group": res.group, "kind": res.plural})
        if not isinstance(new, dict):
            raise ApiError(422, "Invalid", "the patched object is not an object")

        has_status = "status" in info.subresources
        if sub == "status":       # the status subresource writes the status and nothing else
            merged = copy.deepcopy(old)
            if "status" in new:
                merged["status"] = new["status"]
            else:
                merged.pop("status", None)
            new = merged
        elif has_status:          # the main resource never writes the status
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)

        meta = new.setdefault("metadata", {}) if isinstance(new.get("metadata"), dict) else new.setdefault("metadata", {})
        if not isinstance(meta, dict):
            new["metadata"] = meta = {}
        for k in ("name", "uid", "creationTimestamp", "generation", "deletionTimestamp", "namespace",
                  "deletionGracePeriodSeconds"):
            if k in old["metadata"]:
                meta[k] = old["metadata"][k]
            else:
                meta.pop(k, None)
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        for k in ("labels", "annotations", "finalizers", "ownerReferences"):
            if k in meta and not meta[k]:
                del meta[k]
        self._normalize(res, new)
        if old["metadata"].get("deletionTimestamp"):
            added = set(meta.get("finalizers", [])) - set(old["metadata"].get("finalizers", []))
            if added:
                raise ApiError(422, "Invalid", "metadata.finalizers: Forbidden: no new finalizers can be added "
                                               "if the object is being deleted")
        if new == old:
            return old, 200       # a no-op write: no new resourceVersion, no watch event

        def body_part(o: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in o.items() if k not in ("metadata", "status", "apiVersion", "kind")}
        if body_part(new) != body_part(old):
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        meta["resourceVersion"] = self._next_rv()
        if res == self._crd_res():
            self._declare_crd(new)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self.store.pop(key, None)
            self._mirror(key, None)
            await self._emit(res, "DELETED", new)
            await self._collect_garbage(new, "Background")
            return new, 200
        self.store[key] = new
        self._mirror(key, new)
        await self._emit(res, "MODIFIED", new, old)
        return new, 200

    async def _delete(self, res: kmock.resource, ns: str | None, name: str, policy: str,
                      preconditions: dict[str, Any] | None) -> dict[str, Any]:
        key = (res, ns, name)
        obj = self.store.get(key)
        if obj is None:
            raise self._not_found(res, name)
        if preconditions:
            for field in ("uid", "resourceVersion"):
                if preconditions.get(field) and preconditions[field] != obj["metadata"].get(field):
                    raise ApiError(409, "Conflict", f"Precondition failed: {field} mismatch")
        if obj["metadata"].get("finalizers"):
            if obj["metadata"].get("deletionTimestamp"):
                return obj
            obj = copy.deepcopy(obj)
            obj["metadata"]["deletionTimestamp"] = _now()
            obj["metadata"]["deletionGracePeriodSeconds"] = 0
            obj["metadata"]["resourceVersion"] = self._next_rv()
            old, self.store[key] = self.store[key], obj
            self._mirror(key, obj)
            await self._emit(res, "MODIFIED", obj, old)
            return obj
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self.store.pop(key, None)
        self._mirror(key, None)
        if res == self._crd_res():
            self._undeclare_crd(obj)
        await self._emit(res, "DELETED", obj)
        await self._collect_garbage(obj, policy)
        return obj

    async def _collect_garbage(self, owner: dict[str, Any], policy: str) -> None:
        """The garbage collector, synchronously: delete (or orphan) the dependents of a gone owner."""
        uid = owner["metadata"].get("uid")
        for (r, n, nm), obj in list(self.store.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if not any(ref.get("uid") == uid for ref in refs):
                continue
            if policy == "Orphan":
                await self._update(r, n, nm, None, [
                    {"op": "replace", "path": "/metadata/ownerReferences",
                     "value": [ref for ref in refs if ref.get("uid") != uid]}], "application/json-patch+json", False)
            else:
                try:
                    await self._delete(r, n, nm, "Background", None)
                except ApiError:
                    pass

    # -- CRDs ----------------------------------------------------------------------------------

    @staticmethod
    def _crd_res() -> kmock.resource:
        return kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")

    def _declare_crd(self, crd: dict[str, Any]) -> None:
        """A stored CRD declares its resource for discovery (and becomes Established)."""
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        group, plural = spec.get("group"), names.get("plural")
        if not group or not plural:
            raise ApiError(422, "Invalid", "spec.group and spec.names.plural are required")
        self._undeclare_crd(crd)
        declared = []
        for version in spec.get("versions") or []:
            if not version.get("served", True):
                continue
            res = kmock.resource(group, version["name"], plural)
            self.resources[res] = kmock.ResourceInfo(
                kind=names.get("kind"), singular=names.get("singular") or names.get("kind", "").lower(),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                verbs={"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"},
                shortnames=set(names.get("shortNames") or []), categories=set(names.get("categories") or []),
                subresources={"status"} if "status" in (version.get("subresources") or {}) else set())
            columns = version.get("additionalPrinterColumns")
            if columns is not None:
                self.printer_columns[res] = columns
            schema = (version.get("schema") or {}).get("openAPIV3Schema")
            if schema:
                self.crd_schemas[res] = schema
            declared.append(res)
        self.crd_resources[crd["metadata"]["name"]] = declared
        status = crd.setdefault("status", {})
        status["acceptedNames"] = {k: v for k, v in names.items()}
        status["storedVersions"] = [v["name"] for v in spec.get("versions") or [] if v.get("storage")]
        status["conditions"] = [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found",
             "lastTransitionTime": _now()},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
             "message": "the initial names have been accepted", "lastTransitionTime": _now()},
        ]

    def _undeclare_crd(self, crd: dict[str, Any]) -> None:
        for res in self.crd_resources.pop(crd["metadata"]["name"], []):
            if res in self.resources:
                del self.resources[res]
            self.printer_columns.pop(res, None)
            for key in [k for k in self.store if k[0] == res]:
                self.store.pop(key)
                self._mirror(key, None)

    # -- seeding (from the server's loop) ------------------------------------------------------

    async def seed(self, res: kmock.resource, body: dict[str, Any]) -> dict[str, Any]:
        info = self._info(res)
        ns = body.get("metadata", {}).get("namespace") if info.namespaced else None
        if info.namespaced and ns is None:
            ns = "default"
        return await self._create(res, ns, body)


# ---------------------------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------------------------

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
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "emulated", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"username": "tester", "password": "tester"}}],
            "contexts": [{"name": "emulated", "context": {"cluster": "emulated", "user": "tester",
                                                          "namespace": self.namespace}}],
            "current-context": "emulated",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))

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

def _job_condition(job: dict[str, Any], ctype: str) -> bool:
    return any(c.get("type") == ctype and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


def _compress(indexes: Iterable[int]) -> str:
    """{0,1,2,5} -> '0-2,5' (the Job controller's interval notation)."""
    out, run = [], []
    for i in sorted(set(indexes)):
        if run and i == run[-1] + 1:
            run.append(i)
        else:
            if run:
                out.append(f"{run[0]}-{run[-1]}" if len(run) > 2 else ",".join(map(str, run)))
            run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 2 else ",".join(map(str, run)))
    return ",".join(out)


class Pod:
    def __init__(self, job: "JobRun", index: int, attempt: int):
        self.job, self.index, self.attempt = job, index, attempt
        suffix = "".join(uuid.uuid4().hex[:5])
        self.name = f"{job.name}-{index}-{suffix}" if job.indexed else f"{job.name}-{suffix}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: pathlib.Path | None = None
        self.preempted = False
        self.exit_code: int | None = None


class JobRun:
    """One Job's pods and the Job controller's bookkeeping."""

    def __init__(self, job: dict[str, Any]):
        meta, spec = job["metadata"], job.get("spec") or {}
        self.uid, self.name, self.namespace = meta["uid"], meta["name"], meta.get("namespace", "default")
        self.spec = spec
        self.indexed = spec.get("completionMode") == "Indexed"
        self.completions = int(spec.get("completions") or 1)
        self.parallelism = int(spec.get("parallelism") if spec.get("parallelism") is not None else 1)
        self.backoff_limit = spec.get("backoffLimit")
        self.per_index = spec.get("backoffLimitPerIndex")
        self.max_failed_indexes = spec.get("maxFailedIndexes")
        self.deadline = spec.get("activeDeadlineSeconds")
        self.policy = (spec.get("podFailurePolicy") or {}).get("rules") or []
        self.pods: dict[int, Pod] = {}                    # running, by index (or ordinal)
        self.succeeded: set[int] = set()
        self.failed_indexes: set[int] = set()
        self.index_failures: collections.Counter[int] = collections.Counter()
        self.failed_pods = 0                               # counted failures (status.failed)
        self.ignored_failures = 0
        self.retry_at: dict[int, float] = {}
        self.attempts: collections.Counter[int] = collections.Counter()
        self.start_time: str | None = None
        self.started_mono: float | None = None
        self.finished: str | None = None                   # 'Complete' | 'Failed'
        self.finish_reason = ""
        self.finish_message = ""
        self.completion_time: str | None = None
        self.last_status: dict[str, Any] | None = None
        self.waiting_reason: dict[int, str] = {}
        self.waiting_pod: dict[int, str] = {}             # index -> name of its Pod object while waiting
        self.all_pods: list[Pod] = []

    def pending_indexes(self) -> list[int]:
        done = self.succeeded | self.failed_indexes | set(self.pods)
        if self.indexed:
            return [i for i in range(self.completions) if i not in done]
        need = self.completions - len(self.succeeded) - len(self.pods)
        free = [i for i in range(self.completions) if i not in done]
        return free[:max(need, 0)]


class Kubelet:
    """Plays kubelet + Job controller for batch/v1 Jobs in a Cluster, running each pod's single
    container as a local process (see module doc and tests/README.md for what is and isn't emulated).

    command_map(argv) -> argv translates an image command into a local one.
    """

    def __init__(self, cluster: Cluster, *, command_map: Callable[[list[str]], list[str]] | None = None,
                 logs_dir: str | os.PathLike[str] | None = None, poll_interval: float = 0.05,
                 retry_delay: float = 0.0, cwd: str | os.PathLike[str] | None = None,
                 extra_env: Mapping[str, str] | None = None, override_env: Mapping[str, str] | None = None):
        self.cluster = cluster
        self.override_env = dict(override_env or {})  # applied after the container's own env
        self.command_map = command_map or (lambda argv: argv)
        self.logs_dir = pathlib.Path(logs_dir or cluster.workdir / "pod-logs")
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.poll_interval = poll_interval
        self.retry_delay = retry_delay
        self.cwd = str(cwd or REPO)
        self.extra_env = dict(extra_env or {})
        self.jobs: dict[str, JobRun] = {}                # by uid
        self.unpullable: set[str] = set()                # images whose pull fails (ErrImagePull)
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    def __enter__(self) -> "Kubelet":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> "Kubelet":
        self._thread = threading.Thread(target=self._loop, name="fake-kubelet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        with self.lock:
            for run in self.jobs.values():
                for pod in list(run.pods.values()):
                    self._kill(pod)

    # -- public hooks ---------------------------------------------------------------------------

    def _run_named(self, job_name: str, namespace: str | None) -> JobRun | None:
        ns = namespace or self.cluster.namespace
        with self.lock:
            runs = [r for r in self.jobs.values() if r.name == job_name and r.namespace == ns]
        return runs[-1] if runs else None

    def processes(self, job_name: str, namespace: str | None = None) -> dict[int, int]:
        """{index: pid} of the Job's running pods."""
        run = self._run_named(job_name, namespace)
        if run is None:
            return {}
        with self.lock:
            return {i: p.proc.pid for i, p in run.pods.items() if p.proc is not None and p.proc.poll() is None}

    def logs(self, job_name: str, namespace: str | None = None) -> list[pathlib.Path]:
        """Log files of all the Job's pods so far (one per pod, in start order)."""
        run = self._run_named(job_name, namespace)
        return [p.log_path for p in (run.all_pods if run else []) if p.log_path is not None]

    def all_logs(self) -> list[pathlib.Path]:
        return sorted(self.logs_dir.glob("*.log"))

    def dump_logs(self, limit: int = 4000) -> str:
        chunks = []
        for path in self.all_logs():
            text = path.read_text(errors="replace")
            chunks.append(f"----- {path.name} -----\n{text[-limit:]}")
        return "\n".join(chunks)

    def preempt(self, job_name: str, index: int, namespace: str | None = None) -> int:
        """Kill that pod's process as a disruption (pod condition DisruptionTarget=True). Returns the pid."""
        run = self._run_named(job_name, namespace)
        if run is None:
            raise KeyError(f"no job {job_name!r}")
        with self.lock:
            pod = run.pods.get(index)
            if pod is None or pod.proc is None:
                raise KeyError(f"job {job_name!r} has no running pod for index {index}")
            pod.preempted = True
            pid = pod.proc.pid
            self._kill(pod)
        return pid

    def wait_finished(self, job_name: str, namespace: str | None = None, timeout: float = 20) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            job = self.cluster.get("jobs", job_name, namespace)
            if job and (_job_condition(job, "Complete") or _job_condition(job, "Failed")):
                return job
            return None
        try:
            return self.cluster.wait_for(finished, timeout, message=f"job {job_name} to finish")
        except TimeoutError:
            raise TimeoutError(f"job {job_name} did not finish in {timeout}s; pod logs:\n{self.dump_logs()}") from None

    # -- the loop -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - keep playing kubelet; keep the error for the test
                self.errors.append(traceback.format_exc())
                if len(self.errors) > 50:
                    del self.errors[:25]
            self._stop.wait(self.poll_interval)

    def _tick(self) -> None:
        try:
            jobs = self.cluster.list("jobs", namespace="*")
        except (ClusterApiError, OSError):
            return
        seen = set()
        for job in jobs:
            uid = job["metadata"]["uid"]
            seen.add(uid)
            with self.lock:
                run = self.jobs.get(uid)
                if run is None:
                    if _job_condition(job, "Complete") or _job_condition(job, "Failed"):
                        continue
                    run = self.jobs[uid] = JobRun(job)
            self._sync(run, job)
        with self.lock:
            gone = [uid for uid in self.jobs if uid not in seen]
            for uid in gone:                  # deleted Jobs: kill their pods
                run = self.jobs.pop(uid)
                for pod in list(run.pods.values()):
                    self._kill(pod)
                    run.pods.pop(pod.index, None)

    def _sync(self, run: JobRun, job: dict[str, Any]) -> None:
        if run.finished:
            self._write_status(run)
            return
        suspended = bool((job.get("spec") or {}).get("suspend"))
        now = time.monotonic()
        with self.lock:
            # Reap exited pods.
            for index, pod in list(run.pods.items()):
                if pod.proc is None or pod.proc.poll() is None:
                    continue
                code = pod.proc.returncode
                pod.exit_code = 128 + (-code) if code < 0 else code
                del run.pods[index]
                self._account(run, pod)
                if run.finished:
                    break
            if suspended and not run.finished:
                for pod in list(run.pods.values()):   # suspension deletes the active pods
                    pod.preempted = True
                    self._kill(pod)
                    run.pods.pop(pod.index, None)
                run.start_time = None if not run.succeeded and not run.failed_pods else run.start_time
            if not run.finished and not suspended:
                if run.start_time is None:
                    run.start_time, run.started_mono = _now(), now
                if run.deadline is not None and run.started_mono is not None \
                        and now - run.started_mono > float(run.deadline):
                    self._finish(run, "Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
                elif run.indexed and run.succeeded | run.failed_indexes >= set(range(run.completions)) \
                        or not run.indexed and len(run.succeeded) >= run.completions:
                    if run.failed_indexes:
                        self._finish(run, "Failed", "FailedIndexes", "Job has failed indexes")
                    else:
                        self._finish(run, "Complete", "CompletionsReached", "Reached expected number of succeeded pods")
                else:
                    for index in run.pending_indexes():
                        if len(run.pods) >= run.parallelism:
                            break
                        if run.retry_at.get(index, 0) > now:
                            continue
                        self._start(run, job, index)
        self._write_status(run)

    def _account(self, run: JobRun, pod: Pod) -> None:
        """The Job controller's view of a terminated pod."""
        self._publish(run, pod.name, pod.index, "", "Succeeded" if pod.exit_code == 0 and not pod.preempted
                      else "Failed", {"terminated": {"exitCode": pod.exit_code or 0, "finishedAt": _now()}})
        if pod.exit_code == 0 and not pod.preempted:
            if run.indexed:
                run.succeeded.add(pod.index)
            else:
                run.succeeded.add(len(run.succeeded))
            return
        action = "Count"
        for rule in run.policy:
            if self._rule_matches(rule, pod):
                action = rule.get("action", "Count")
                break
        if action == "Ignore":
            run.ignored_failures += 1
            return
        run.failed_pods += 1
        if action == "FailJob":
            self._finish(run, "Failed", "PodFailurePolicy",
                         f"Container of pod {pod.name} failed with exit code {pod.exit_code} matching FailJob rule")
            return
        if action == "FailIndex":
            run.failed_indexes.add(pod.index)
        else:
            run.index_failures[pod.index] += 1
            if run.per_index is not None:
                if run.index_failures[pod.index] > int(run.per_index):
                    run.failed_indexes.add(pod.index)
            if run.backoff_limit is not None and run.failed_pods > int(run.backoff_limit):
                self._finish(run, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
                return
        if run.max_failed_indexes is not None and len(run.failed_indexes) > int(run.max_failed_indexes):
            self._finish(run, "Failed", "MaxFailedIndexesExceeded", "Job has exceeded the specified maximal "
                                                                     "number of failed indexes")
            return
        if pod.index not in run.failed_indexes:
            run.retry_at[pod.index] = time.monotonic() + self.retry_delay

    @staticmethod
    def _rule_matches(rule: dict[str, Any], pod: Pod) -> bool:
        on_codes = rule.get("onExitCodes")
        if on_codes:
            values = set(on_codes.get("values") or [])
            if on_codes.get("operator", "In") == "In":
                return pod.exit_code in values
            return pod.exit_code not in values and pod.exit_code != 0
        for cond in rule.get("onPodConditions") or []:
            if cond.get("type") == "DisruptionTarget" and pod.preempted and cond.get("status", "True") == "True":
                return True
        return False

    def _finish(self, run: JobRun, kind: str, reason: str, message: str) -> None:
        run.finished, run.finish_reason, run.finish_message = kind, reason, message
        run.completion_time = _now()
        for pod in list(run.pods.values()):
            self._kill(pod)
        run.pods.clear()

    def _write_status(self, run: JobRun) -> None:
        status: dict[str, Any] = {
            "active": len(run.pods),
            "succeeded": len(run.succeeded),
            "failed": run.failed_pods,
            "ready": len(run.pods),
            "terminating": 0,
        }
        if run.start_time:
            status["startTime"] = run.start_time
        if run.indexed:
            status["completedIndexes"] = _compress(run.succeeded)
            if run.per_index is not None or run.failed_indexes:
                status["failedIndexes"] = _compress(run.failed_indexes)
        if run.finished:
            status["active"] = status["ready"] = 0
            if run.finished == "Complete":
                status["completionTime"] = run.completion_time
                pre = "SuccessCriteriaMet"
            else:
                pre = "FailureTarget"
            status["conditions"] = [
                {"type": pre, "status": "True", "reason": run.finish_reason, "message": run.finish_message,
                 "lastProbeTime": run.completion_time, "lastTransitionTime": run.completion_time},
                {"type": run.finished, "status": "True", "reason": run.finish_reason, "message": run.finish_message,
                 "lastProbeTime": run.completion_time, "lastTransitionTime": run.completion_time},
            ]
        if status == run.last_status:
            return
        try:
            # Replace the whole status (a merge patch could not drop stale keys).
            self.cluster.patch("jobs.batch", run.name, [{"op": "add", "path": "/status", "value": status}],
                               run.namespace, "status", "application/json-patch+json")
            run.last_status = status
        except ClusterApiError as e:
            if e.code != 404:
                raise

    # -- pods -----------------------------------------------------------------------------------

    def _publish(self, run: JobRun, name: str, index: int, container: str, phase: str,
                 state: dict[str, Any]) -> None:
        """The Pod object a kubelet reports (what `kubectl get pods` and the operator read); owned by
        its Job, so deleting the Job deletes it."""
        status = {"phase": phase, "conditions": [{"type": "PodScheduled", "status": "True"}],
                  "containerStatuses": [{"name": container, "ready": phase == "Running", "restartCount": 0,
                                         "image": "", "imageID": "", "state": state}]}
        try:
            if self.cluster.get("pods", name, run.namespace) is None:
                labels = {"job-name": run.name, "controller-uid": run.uid}
                if run.indexed:
                    labels["batch.kubernetes.io/job-completion-index"] = str(index)
                self.cluster.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
                    "name": name, "namespace": run.namespace, "labels": labels,
                    "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": run.name, "uid": run.uid,
                                         "controller": True, "blockOwnerDeletion": True}]},
                    "spec": {"containers": [{"name": container, "image": ""}], "nodeName": "emulated-node"}},
                    run.namespace)
            self.cluster.patch("pods", name, {"status": status}, run.namespace, "status")
        except ClusterApiError as e:
            if e.code not in (404, 409):
                raise

    def _wait_pod(self, run: JobRun, index: int, container: str, reason: str, message: str) -> None:
        name = run.waiting_pod.setdefault(index, f"{run.name}-{index}-{uuid.uuid4().hex[:5]}")
        if run.waiting_reason.get(index) != reason + message:
            self._publish(run, name, index, container, "Pending", {"waiting": {"reason": reason, "message": message}})
        run.waiting_reason[index] = reason + message
        run.retry_at[index] = time.monotonic() + 0.2

    def _start(self, run: JobRun, job: dict[str, Any], index: int) -> None:
        template = ((job.get("spec") or {}).get("template") or {})
        pod_spec = template.get("spec") or {}
        containers = pod_spec.get("containers") or []
        if len(containers) != 1:
            self._finish(run, "Failed", "Unsupported", "the emulated kubelet runs exactly one container per pod")
            return
        container = containers[0]
        pod = Pod(run, index, run.attempts[index])
        if container.get("image") in self.unpullable:   # ErrImagePull: keep waiting, as a kubelet does
            self._wait_pod(run, index, container.get("name", ""), "ErrImagePull",
                           f'failed to pull image "{container.get("image")}": not found')
            return
        try:
            env = self._env(run, pod, container, template)
        except LookupError as e:             # CreateContainerConfigError: keep waiting, as a kubelet does
            self._wait_pod(run, index, container.get("name", ""), "CreateContainerConfigError", str(e))
            return
        run.waiting_reason.pop(index, None)
        if index in run.waiting_pod:
            pod.name = run.waiting_pod.pop(index)
        argv = list(container.get("command") or []) + list(container.get("args") or [])
        argv = [self._expand(a, env) for a in argv]
        argv = list(self.command_map(argv))
        run.attempts[index] += 1
        pod.log_path = self.logs_dir / f"{run.namespace}_{pod.name}.log"
        cwd = container.get("workingDir")
        cwd = cwd if cwd and os.path.isdir(cwd) else self.cwd
        with open(pod.log_path, "wb") as log:
            log.write(f"# pod {pod.name} index={index} attempt={pod.attempt} argv={argv!r}\n".encode())
            log.flush()
            try:
                pod.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, cwd=cwd, start_new_session=True)
            except OSError as e:             # like a container that cannot start: exit code 127/128
                log.write(f"# cannot start: {e}\n".encode())
                pod.exit_code = 127
                run.all_pods.append(pod)
                self._account(run, pod)
                return
        run.pods[index] = pod
        run.all_pods.append(pod)
        self._publish(run, pod.name, index, container.get("name", ""), "Running",
                      {"running": {"startedAt": _now()}})

    @staticmethod
    def _expand(arg: str, env: Mapping[str, str]) -> str:
        """Kubernetes' $(VAR) expansion in command/args."""
        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)

    def _secret(self, run: JobRun, kind: str, name: str, optional: bool) -> dict[str, str] | None:
        obj = self.cluster.get(kind, name, run.namespace)
        if obj is None:
            if optional:
                return None
            raise LookupError(f'{kind} "{name}" not found')
        if kind == "secrets":
            return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
        return dict(obj.get("data") or {})

    def _env(self, run: JobRun, pod: Pod, container: dict[str, Any], template: dict[str, Any]) -> dict[str, str]:
        env = self.cluster.env
        env.update(self.extra_env)
        env["HOSTNAME"] = pod.name
        env["PYTHONUNBUFFERED"] = "1"
        if run.indexed:
            env["JOB_COMPLETION_INDEX"] = str(pod.index)
        for src in container.get("envFrom") or []:
            prefix = src.get("prefix", "")
            for kind, key in (("secrets", "secretRef"), ("configmaps", "configMapRef")):
                if key in src:
                    ref = src[key]
                    data = self._secret(run, kind, ref["name"], bool(ref.get("optional")))
                    for k, v in (data or {}).items():
                        env[prefix + k] = v
        fields = {
            "metadata.name": pod.name, "metadata.namespace": run.namespace, "metadata.uid": str(uuid.uuid4()),
            "spec.nodeName": "emulated-node", "spec.serviceAccountName": "default",
            "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1",
        }
        annotations = dict((template.get("metadata") or {}).get("annotations") or {})
        labels = dict((template.get("metadata") or {}).get("labels") or {})
        labels.setdefault("job-name", run.name)
        if run.indexed:
            annotations["batch.kubernetes.io/job-completion-index"] = str(pod.index)
            labels["batch.kubernetes.io/job-completion-index"] = str(pod.index)
        for item in container.get("env") or []:
            name = item["name"]
            if "value" in item:
                env[name] = self._expand(str(item["value"]), env)
                continue
            ref = item.get("valueFrom") or {}
            if "secretKeyRef" in ref or "configMapKeyRef" in ref:
                kind, sel = ("secrets", ref["secretKeyRef"]) if "secretKeyRef" in ref else ("configmaps", ref["configMapKeyRef"])
                data = self._secret(run, kind, sel["name"], bool(sel.get("optional")))
                if data is None or sel["key"] not in data:
                    if sel.get("optional"):
                        continue
                    raise LookupError(f'couldn\'t find key {sel["key"]} in {kind} {sel["name"]}')
                env[name] = data[sel["key"]]
            elif "fieldRef" in ref:
                path = ref["fieldRef"]["fieldPath"]
                m = re.match(r"metadata\.(labels|annotations)\['(.+)'\]", path)
                if m:
                    env[name] = (labels if m.group(1) == "labels" else annotations).get(m.group(2), "")
                else:
                    env[name] = fields.get(path, "")
            else:
                env[name] = ""
        env.update(self.override_env)
        return env

    @staticmethod
    def _kill(pod: Pod) -> None:
        if pod.proc is None or pod.proc.poll() is not None:
            return
        try:
            os.killpg(pod.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                pod.proc.kill()
            except ProcessLookupError:
                pass
        try:
            pod.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
