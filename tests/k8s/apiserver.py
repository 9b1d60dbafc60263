"""The API server: kmock's emulator made strict enough for kopf, kubectl and the `kubernetes`
client (see the package docstring and tests/README.md)."""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import datetime
import json
import pathlib
import re
import time
import traceback
import uuid
from typing import Any

import aiohttp.web
import kmock
import yaml
from kmock._internal import enums, rendering

from . import names, rbac
from .admission import AdmissionMixin, begin_request, warning_header
from .errors import ApiError, FieldError
from .faults import Faults
from .patches import PatchError, PatchTestFailed, json_patch, merge_patch
from .selectors import match_fields, match_labels

REPO = pathlib.Path(__file__).resolve().parents[2]
PRUNEJOB_CRD = REPO / "crds" / "prunejob.yaml"
MAX_REQUEST_HISTORY = 200     # kmock re-checks its whole request history on each request
MAX_EVENT_LOG = 20_000        # watch events kept for resuming watches by resourceVersion
BOOKMARK_INTERVAL = 5.0       # seconds between watch bookmarks (kopf's inactivity timeout is 70 s)


def _now() -> str:
    return datetime.datetime.now(tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_PATH_STEP = re.compile(r"""\.([A-Za-z0-9_-]+)|\[(\d+)\]|\[\?\(@\.([A-Za-z0-9_.-]+)\s*==\s*(?:"([^"]*)"|'([^']*)')\)\]""")


def column_value(obj: Any, path: str) -> Any:
    """A printer column's value as the API server's table convertor takes it: the first result of
    the JSONPath, or None. Fields (`.a.b`), indexes (`[0]`) and equality filters on lists
    (`[?(@.type=="Failed")]`, the form condition columns use) are understood; anything else raises,
    so a column the emulator cannot print fails the test instead of showing blank."""
    values, pos = [obj], 0
    while pos < len(path):
        m = _PATH_STEP.match(path, pos)
        if m is None:
            raise ValueError(f"printer column JSONPath {path!r}: unsupported at {path[pos:]!r}")
        field, index, key, v1, v2 = m.groups()
        pos = m.end()
        nxt: list[Any] = []
        for v in values:
            if field is not None and isinstance(v, dict) and field in v:
                nxt.append(v[field])
            elif index is not None and isinstance(v, list) and int(index) < len(v):
                nxt.append(v[int(index)])
            elif key is not None and isinstance(v, list):
                want = v1 if v1 is not None else v2
                for item in v:
                    cur = item
                    for part in key.split("."):
                        cur = cur.get(part) if isinstance(cur, dict) else None
                    if cur is not None and str(cur) == want:
                        nxt.append(item)
        values = nxt
    return values[0] if values and values[0] is not obj else None


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


class _NotJson(Exception):
    pass


def _no_json_constant(name: str):
    """Go's JSON decoder has no NaN or Infinity (Python's json.loads and json.dumps do): a body with
    one is a 400, so a client that writes a NaN fitness into a status fails on a real server too."""
    raise _NotJson(f"invalid character {name[0] if name[0] != '-' else name[1]!r} looking for beginning of value")


def _has_non_finite(value) -> bool:
    if isinstance(value, float):
        return value != value or value in (float("inf"), float("-inf"))
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_non_finite(v) for v in value)
    return False


class ClusterEmulator(AdmissionMixin, kmock.KubernetesEmulator):
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
        self.crd_schemas: dict[kmock.resource, dict[str, Any]] = {}  # its openAPIV3Schema
        self.faults = Faults()     # injected errors (thread-safe: tests add them from their thread)
        self.tokens = rbac.Tokens()  # bearer token -> identity; requests without one are the administrator's
        self.printer_columns: dict[kmock.resource, list[dict[str, Any]]] = {}

    # -- plumbing ------------------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Replaces kmock's entry point: kmock's path parser fails on `/api/v1/namespaces`
        and `/api/v1/namespaces/NAME` (500), and kmock keeps every request forever."""
        await raw_request.read()
        self.request_count += 1
        fault = self.faults.take(raw_request.method, raw_request.path_qs)
        if fault is not None:
            return self._answer_fault(raw_request, fault)
        user = self.tokens.user(raw_request.headers.get("Authorization"))
        if user is False:
            return aiohttp.web.json_response(ApiError(401, "Unauthorized", "Unauthorized").status(), status=401)
        try:
            request = await self._parse(raw_request)
            if user is not None:
                self._authorize(request, user)
            self._requests.append(request)
            if len(self._requests) > MAX_REQUEST_HISTORY:     # cap the history (kmock walks it all)
                del self._requests[:-MAX_REQUEST_HISTORY // 2]
            for payload in self._payloads:
                if len(payload._requests) > MAX_REQUEST_HISTORY:
                    del payload._requests[:-MAX_REQUEST_HISTORY // 2]
            if request.resource is None or request.resource.plural is None:
                return await kmock.RawHandler._handle(self, request)   # discovery & co: kmock's DSL
            state = begin_request(request.params)
            response = await self._serve(request)
            for text in state["warnings"]:
                response.headers.add("Warning", warning_header(text))
            return response
        except ApiError as e:
            return aiohttp.web.json_response(e.status(), status=e.code)
        except kmock.KubernetesError as e:   # kmock's 404s for unknown endpoints (e.g. /openapi/v3)
            return aiohttp.web.json_response(ApiError(e.status, "NotFound" if e.status == 404 else (e.reason or ""),
                                                      e.message or "").status(), status=e.status)
        except Exception as e:  # noqa: BLE001 - a 500 with the traceback, as kmock does
            self.server_errors.append(traceback.format_exc())
            del self.server_errors[:-50]
            return await self._render_error(e)

    def _authorize(self, request: rendering.Request, user: rbac.User) -> None:
        """RBAC, for a request made with a token (discovery is open to every authenticated user,
        as the system:discovery ClusterRole makes it)."""
        res = request.resource
        if res is None or res.plural is None:
            return
        ns = request.namespace if res not in self.resources or self._info(res).namespaced else None
        method = str(request.method.value if hasattr(request.method, "value") else request.method).upper()
        verb = rbac.verb(method, request.name, request.params.get("watch", "").lower() in ("true", "1"))
        resource = res.plural + (f"/{request.subresource}" if request.subresource else "")
        objects = [(r.plural, n, obj) for (r, n, _), obj in self.store.items() if r.group == rbac.RBAC]
        if not rbac.allowed(objects, user, verb, res.group, resource, ns, request.name):
            raise ApiError(403, "Forbidden", rbac.forbidden_message(user, verb, res.group, resource, ns, request.name),
                           {"name": request.name, "group": res.group, "kind": res.plural} if request.name
                           else {"group": res.group, "kind": res.plural})

    @staticmethod
    def _answer_fault(raw: aiohttp.web.BaseRequest, fault: Any) -> aiohttp.web.StreamResponse:
        """An injected fault: its error status, or a connection closed without an answer."""
        if fault.reset:
            if raw.transport is not None:
                raw.transport.abort()
            return aiohttp.web.Response(status=500)   # never reaches the client
        return aiohttp.web.json_response(fault.status(), status=fault.code, headers=fault.headers())

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
        that `pj` may mean `prunejobs/status`); list them as the API server does. The core group's
        list is `groupVersion: v1` (kmock writes "/v1", and kubectl then finds no core kind at all:
        `kubectl get secrets` fails and `kubectl get pods` lists metrics.k8s.io's PodMetrics)."""
        doc = await super()._serve_version(request)
        assert request.resource is not None
        if request.resource.group == "":
            doc["groupVersion"] = request.resource.version  # type: ignore[index]
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
            return json.loads(raw, parse_constant=_no_json_constant)
        except _NotJson as e:
            raise ApiError(400, "BadRequest", f"cannot parse the body: {e}") from None
        except ValueError:
            try:
                body = yaml.safe_load(raw)
            except yaml.YAMLError as e:
                raise ApiError(400, "BadRequest", f"cannot parse the body: {e}") from None
            if _has_non_finite(body):   # YAML's .nan and .inf become JSON, which has neither
                raise ApiError(400, "BadRequest", "cannot parse the body: json: unsupported value: NaN or Inf")
            return body

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
        """Server-side printing for `kubectl get`, with a CRD's additionalPrinterColumns (the
        JSONPath subset of column_value)."""
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
                cur = column_value(obj, c.get("jsonPath", ""))
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
                meta["name"] = names.generated_name(meta["generateName"], uuid.uuid4().hex[:5])
            else:
                raise ApiError(422, "Invalid", f"{self._kind(res)} \"\" is invalid: metadata.name: Required value: "
                                               "name or generateName is required", {"kind": self._kind(res)})
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
            template = spec.setdefault("template", {}).setdefault("metadata", {})
            if template.get("labels") and not obj["metadata"].get("labels"):   # SetDefaults_Job
                obj["metadata"]["labels"] = dict(template["labels"])
            if len(obj["metadata"]["name"]) <= 63:   # a longer name is refused (names.validate_job)
                # the Job strategy's generated selector: on the pod template, not on the Job
                uid, name = obj["metadata"]["uid"], obj["metadata"]["name"]
                template.setdefault("labels", {}).update({
                    "batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": name,
                    "controller-uid": uid, "job-name": name})
                spec.setdefault("selector", {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}})
        if res.plural == "namespaces" and res.group == "":
            obj.setdefault("status", {}).setdefault("phase", "Active")

    async def _create(self, res: kmock.resource, ns: str | None, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body must be an object")
        info = self._info(res)
        self._check_namespace(ns)
        obj = self._stamp_new(res, ns, body)
        self._prune(res, obj, whole_body=True)
        if "status" in info.subresources and res != self._crd_res():
            obj.pop("status", None)  # the main resource ignores status (as the real API server does)
        self._default(res, obj)
        self._normalize(res, obj)
        self._validate(res, obj, None)
        key = (res, ns, obj["metadata"]["name"])
        if key in self.store:
            raise ApiError(409, "AlreadyExists", f'{res.plural} "{key[2]}" already exists',
                           {"name": key[2], "group": res.group, "kind": res.plural})
        if res == self._crd_res():
            self._check_crd(obj)
            self._declare_crd(obj)
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self.store[key] = obj
        self._mirror(key, obj)
        await self._emit(res, "ADDED", obj)
        return obj

    async def _update(self, res: kmock.resource, ns: str | None, name: str, sub: str | None, body: Any,
                      ctype: str, replace: bool) -> tuple[dict[str, Any], int]:
        info = self._info(res)
        if not replace and ctype == "application/strategic-merge-patch+json" and res in self.crd_schemas:
            # custom resources have no patch strategy to merge by: the real server refuses the type
            raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                           "accepted media types include: application/json-patch+json, "
                           "application/merge-patch+json, application/apply-patch+yaml")
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
        if replace and not want_rv and res in self.crd_schemas:   # custom resources: no blind PUT
            raise self._invalid(res, name, [FieldError("metadata.resourceVersion", "Invalid",
                                                       "must be specified for an update", 0)])
        self._prune(res, new, whole_body=replace)

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
        self._default(res, new)
        self._normalize(res, new)
        if old["metadata"].get("deletionTimestamp"):
            added = set(meta.get("finalizers", [])) - set(old["metadata"].get("finalizers", []))
            if added:
                raise ApiError(422, "Invalid", "metadata.finalizers: Forbidden: no new finalizers can be added "
                                               "if the object is being deleted")
        self._validate(res, new, old)
        if new == old:
            return old, 200       # a no-op write: no new resourceVersion, no watch event

        def body_part(o: dict[str, Any]) -> dict[str, Any]:
            """What the generation counts: all but metadata (and status where it has its own endpoint)."""
            skip = ("metadata", "apiVersion", "kind", "status") if has_status else ("metadata", "apiVersion", "kind")
            return {k: v for k, v in o.items() if k not in skip}
        if body_part(new) != body_part(old):
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        if res == self._crd_res():
            self._check_crd(new)
            self._declare_crd(new)
        meta["resourceVersion"] = self._next_rv()
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
            if obj["metadata"].get("generation"):   # deletion changes what controllers must do
                obj["metadata"]["generation"] += 1
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
        """A stored CRD declares its resource for discovery (and becomes Established). Updating a
        CRD keeps the objects of the versions it still serves, read through the new schema."""
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        group, plural = spec.get("group"), names.get("plural")
        if not group or not plural:
            raise ApiError(422, "Invalid", "spec.group and spec.names.plural are required")
        served = {kmock.resource(group, v["name"], plural) for v in spec.get("versions") or [] if v.get("served", True)}
        self._undeclare_crd(crd, keep=served)
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
            self._refresh_stored(res)
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

    def _undeclare_crd(self, crd: dict[str, Any], keep: set[kmock.resource] = frozenset()) -> None:
        """Forgets the CRD's resources; deletes the objects of those not in `keep`."""
        for res in self.crd_resources.pop(crd["metadata"]["name"], []):
            if res in self.resources:
                del self.resources[res]
            self.printer_columns.pop(res, None)
            self.crd_schemas.pop(res, None)
            if res in keep:
                continue
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
