"""What kube-apiserver does to an object between decoding a write and storing it, in the order
it does it: prune undeclared fields (and report them per `fieldValidation`), reset what the
endpoint may not write, default, then validate (ObjectMeta, the kind's own rules, a custom
resource's OpenAPI schema and CEL rules). `ClusterEmulator` mixes this in."""

from __future__ import annotations

import contextvars
import copy
from typing import Any

import kmock

from . import cel, jobspec, names, schema
from .errors import ApiError, FieldError, invalid_status

DIRECTIVES = ("Ignore", "Warn", "Strict")
# Per request: the fieldValidation directive and the warnings to send back. A write that does not
# come over HTTP (seeding, garbage collection) has none: it ignores unknown fields silently.
REQUEST: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("request", default=None)


def begin_request(params: dict[str, str]) -> dict[str, Any]:
    """Sets up the request's context; the caller later reads its `warnings`."""
    directive = params.get("fieldValidation") or "Warn"
    if directive not in DIRECTIVES:
        raise ApiError(400, "BadRequest", f'fieldValidation parameter unsupported: "{directive}". '
                                          "Should be one of: Ignore, Warn, Strict")
    state = {"directive": directive, "warnings": []}
    REQUEST.set(state)
    return state


def warning_header(text: str) -> str:
    """An RFC 7234 warning as the server sends it: `299 - "unknown field \\"spec.x\\""`."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'299 - "{escaped}"'


class AdmissionMixin:
    crd_schemas: dict[kmock.resource, dict[str, Any]]
    store: dict[Any, dict[str, Any]]

    def _invalid(self, res: kmock.resource, name: str, errors: list[FieldError]) -> ApiError:
        message, details = invalid_status(self._kind(res), res.group, name, errors)  # type: ignore[attr-defined]
        return ApiError(422, "Invalid", message, details)

    def _prune(self, res: kmock.resource, obj: dict[str, Any], whole_body: bool) -> None:
        """Drops undeclared fields and answers for them per the request's fieldValidation: Warn
        (the default) sends `unknown field "spec.x"` warnings, Strict refuses the write with 400."""
        unknown = schema.prune(self.crd_schemas[res], obj) if res in self.crd_schemas \
            else schema.prune_metadata(obj)
        state = REQUEST.get()
        if not unknown or state is None or state["directive"] == "Ignore":
            return
        texts = [f'unknown field "{path}"' for path in unknown]
        if state["directive"] == "Warn":
            state["warnings"].extend(texts)
            return
        kind = self._kind(res)  # type: ignore[attr-defined]
        prefix = f'{kind} in version "{res.version}" cannot be handled as a {kind}: ' if whole_body else ""
        raise ApiError(400, "BadRequest", prefix + "strict decoding error: " + ", ".join(texts))

    def _default(self, res: kmock.resource, obj: dict[str, Any]) -> None:
        if res in self.crd_schemas:
            schema.default(self.crd_schemas[res], obj)

    def _validate(self, res: kmock.resource, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        """Refuses (422 Invalid, one cause per problem) what the server would refuse."""
        errors = names.validate_meta(res.group, res.plural, obj)
        if res.group == "batch" and res.plural == "jobs":
            errors += names.validate_job(obj) + jobspec.validate(obj, old)
        if res in self.crd_schemas:
            errors += schema.validate(self.crd_schemas[res], obj, old)
        if errors:
            raise self._invalid(res, obj["metadata"].get("name", ""), errors)

    def _check_namespace(self, ns: str | None) -> None:
        """The NamespaceLifecycle admission plugin: no objects in a namespace that does not exist."""
        if ns is None:
            return
        key = (kmock.resource("", "v1", "namespaces"), None, ns)
        if key not in self.store:
            raise ApiError(404, "NotFound", f'namespaces "{ns}" not found',
                           {"name": ns, "kind": "namespaces"})
        if self.store[key]["metadata"].get("deletionTimestamp"):
            raise ApiError(403, "Forbidden", f"unable to create new content in namespace {ns} because it is "
                                             "being terminated")

    def _check_crd(self, crd: dict[str, Any]) -> None:
        """A CRD whose CEL rules do not compile is refused, as the server refuses it."""
        errors = []
        for i, version in enumerate((crd.get("spec") or {}).get("versions") or []):
            root = (version.get("schema") or {}).get("openAPIV3Schema")
            errors += cel.compile_errors(root, f"spec.versions[{i}].schema.openAPIV3Schema")
        if errors:
            message, details = invalid_status("CustomResourceDefinition", "apiextensions.k8s.io",
                                              crd["metadata"].get("name", ""), errors)
            raise ApiError(422, "Invalid", message, details)

    def _refresh_stored(self, res: kmock.resource) -> None:
        """After a CRD's schema changes, stored objects read as the new schema has them (the server
        prunes and defaults on every read from storage), without a new resourceVersion."""
        if res not in self.crd_schemas:
            return
        for key, obj in list(self.store.items()):
            if key[0] == res:
                fresh = copy.deepcopy(obj)
                schema.prune(self.crd_schemas[res], fresh)
                schema.default(self.crd_schemas[res], fresh)
                if fresh != obj:
                    self.store[key] = fresh
                    self._mirror(key, fresh)  # type: ignore[attr-defined]
