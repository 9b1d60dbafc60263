"""Structural schemas of custom resources, applied as kube-apiserver applies a CRD's
`openAPIV3Schema`: pruning of undeclared fields, defaulting, and OpenAPI validation (the CEL
rules are in `cel`). Written from the Kubernetes documentation and observed behaviour; it
shares nothing with the product's own reading of the schema, so a test cannot pass because
both sides made the same mistake."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from . import cel
from .errors import FieldError, join_path

# What ObjectMeta decodes: every other key under `metadata` is dropped, for any kind.
OBJECT_META_FIELDS = frozenset({
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations",
    "ownerReferences", "finalizers", "managedFields",
})
PRESERVE = "x-kubernetes-preserve-unknown-fields"
INT_OR_STRING = "x-kubernetes-int-or-string"
EMBEDDED = "x-kubernetes-embedded-resource"


def _index(path: str, i: int | str) -> str:
    return f"{path}[{i}]"


# -- pruning ---------------------------------------------------------------------------------


def prune_metadata(obj: dict[str, Any]) -> list[str]:
    """Drop what ObjectMeta does not declare (the decoder does this for every kind)."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return []
    gone = [k for k in meta if k not in OBJECT_META_FIELDS]
    for k in gone:
        del meta[k]
    return [f"metadata.{k}" for k in gone]


def prune(schema: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    """Remove every field the schema does not declare; returns their paths (`spec.x`), which the
    server reports as `unknown field "spec.x"` (Warn) or refuses (Strict)."""
    removed = prune_metadata(obj)
    props = schema.get("properties") or {}
    for key in list(obj):
        if key in ("apiVersion", "kind", "metadata"):
            continue
        if key in props:
            _prune(props[key], obj[key], key, removed)
        elif not schema.get(PRESERVE):
            del obj[key]
            removed.append(key)
    return removed


def _prune(node: dict[str, Any], value: Any, path: str, removed: list[str]) -> None:
    if isinstance(value, list):
        items = node.get("items")
        if isinstance(items, dict):
            for i, item in enumerate(value):
                _prune(items, item, _index(path, i), removed)
        return
    if not isinstance(value, dict):
        return
    props = node.get("properties") or {}
    extra = node.get("additionalProperties")
    for key in list(value):
        if key in props:
            _prune(props[key], value[key], join_path(path, key), removed)
        elif isinstance(extra, dict):
            _prune(extra, value[key], _index(path, key), removed)
        elif node.get(EMBEDDED) and key in ("apiVersion", "kind", "metadata"):
            if key == "metadata":
                removed.extend(f"{path}.{p}" for p in prune_metadata(value))
        elif extra is not True and not node.get(PRESERVE):
            del value[key]
            removed.append(join_path(path, key))


# -- defaulting ------------------------------------------------------------------------------


def default(schema: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    """The server's defaulting, on every write and every read: an absent property with a
    `default` gets it (then its own defaults), a non-nullable null is defaulted or dropped, and
    items and map values are defaulted too. `metadata` is left alone."""
    props = schema.get("properties") or {}
    for key, sub in props.items():
        if key != "metadata":
            _default_property(obj, key, sub)
    return obj


def _default_property(parent: dict[str, Any], key: str, sub: dict[str, Any]) -> None:
    if key in parent and parent[key] is None and not sub.get("nullable"):
        del parent[key]
    if key not in parent and "default" in sub:
        parent[key] = copy.deepcopy(sub["default"])
    if key in parent:
        _default(sub, parent[key])


def _default(node: dict[str, Any], value: Any) -> None:
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        for item in value:
            _default(node["items"], item)
    if not isinstance(value, dict):
        return
    for key, sub in (node.get("properties") or {}).items():
        _default_property(value, key, sub)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        for key in list(value):
            if key not in (node.get("properties") or {}):
                _default_property(value, key, extra)


# -- validation ------------------------------------------------------------------------------


def same(a: Any, b: Any) -> bool:
    """JSON equality (1 and 1.0 and True differ, as they do on the wire)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def validate(schema: dict[str, Any], new: dict[str, Any], old: dict[str, Any] | None) -> list[FieldError]:
    """OpenAPI validation, then the CEL rules, of everything but `metadata`. On an update a value
    equal to the old one is not checked again (the server's validation ratcheting), so a status
    write does not re-validate the spec and the other way round. A type error anywhere stops the
    CEL rules, as in kube-apiserver."""
    errors: list[FieldError] = []
    nodes = _root_nodes(schema, new, old)
    for sub, value, old_value, has_old, path in nodes:
        _check(sub, value, old_value, has_old, path, errors)
    _check_required(schema, new, "", errors)
    if any(e.kind == "TypeInvalid" for e in errors):
        errors.append(FieldError("", "Invalid", "some validation rules were not checked because the object was "
                                                "invalid; correct the existing errors to complete validation", None))
        return errors
    errors.extend(cel.check_rules(schema, _without_meta(new), _without_meta(old) if old else None,
                                  old is not None, ""))
    for sub, value, old_value, has_old, path in nodes:
        errors.extend(cel.check_tree(sub, value, old_value, has_old, path))
    return errors


def _without_meta(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != "metadata"}


def _root_nodes(schema: dict[str, Any], new: dict[str, Any], old: dict[str, Any] | None) -> list[tuple]:
    props = schema.get("properties") or {}
    out = []
    for key, value in new.items():
        if key in ("metadata", "apiVersion", "kind") or key not in props:
            continue
        has_old = old is not None and key in old
        out.append((props[key], value, old.get(key) if has_old else None, has_old, key))
    return out


TYPES = {
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: not isinstance(v, bool) and (isinstance(v, int) or isinstance(v, float) and v.is_integer()),
    "number": lambda v: not isinstance(v, bool) and isinstance(v, (int, float)),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def json_type(value: Any) -> str:
    for name in ("boolean", "integer", "number", "string", "object", "array"):
        if TYPES[name](value):
            return name
    return "null"


def _type_error(node: dict[str, Any], value: Any, path: str) -> FieldError | None:
    if value is None and node.get("nullable"):
        return None
    if node.get(INT_OR_STRING):
        expected, ok = "integer,string", TYPES["integer"](value) or isinstance(value, str)
    elif node.get("type"):
        expected, ok = node["type"], TYPES.get(node["type"], lambda v: True)(value)
    else:
        return None
    if ok:
        return None
    actual = json_type(value)
    return FieldError(path, "TypeInvalid", f'{path} in body must be of type {expected}: "{actual}"', actual)


def _check(node: dict[str, Any], value: Any, old: Any, has_old: bool, path: str,
           errors: list[FieldError]) -> None:
    if has_old and same(value, old):
        return                       # ratcheting: an unchanged value stays valid
    problem = _type_error(node, value, path)
    if problem is not None:
        errors.append(problem)
        return
    if value is None:
        return
    _check_value(node, value, path, errors)
    if isinstance(value, dict):
        _check_object(node, value, old if has_old and isinstance(old, dict) else None, path, errors)
    elif isinstance(value, list):
        _check_array(node, value, old if has_old and isinstance(old, list) else None, path, errors)


def _check_required(node: dict[str, Any], value: Any, path: str, errors: list[FieldError]) -> None:
    if isinstance(value, dict):
        for key in node.get("required") or []:
            if key not in value:
                errors.append(FieldError(join_path(path, key), "Required"))


def _check_object(node: dict[str, Any], value: dict[str, Any], old: dict[str, Any] | None, path: str,
                  errors: list[FieldError]) -> None:
    _check_required(node, value, path, errors)
    props = node.get("properties") or {}
    extra = node.get("additionalProperties")
    for key, sub_value in value.items():
        sub = props.get(key)
        sub_path = join_path(path, key)
        if sub is None and isinstance(extra, dict):
            sub, sub_path = extra, _index(path, key)
        if sub is not None:
            has = old is not None and key in old
            _check(sub, sub_value, old.get(key) if has else None, has, sub_path, errors)
    for bound, op, text in (("minProperties", "__lt__", "at least"), ("maxProperties", "__gt__", "at most")):
        if bound in node and getattr(len(value), op)(node[bound]):
            errors.append(FieldError(path, "Invalid", f"{path} in body should have {text} {node[bound]} properties",
                                     len(value)))


def _check_array(node: dict[str, Any], value: list[Any], old: list[Any] | None, path: str,
                 errors: list[FieldError]) -> None:
    if "maxItems" in node and len(value) > node["maxItems"]:
        errors.append(FieldError(path, "TooMany", f"must have at most {node['maxItems']} items", len(value)))
    if "minItems" in node and len(value) < node["minItems"]:
        errors.append(FieldError(path, "Invalid", f"{path} in body should have at least {node['minItems']} items",
                                 len(value)))
    _check_list_type(node, value, path, errors)
    items = node.get("items")
    if not isinstance(items, dict):
        return
    olds = cel.correlate(node, value, old)
    for i, item in enumerate(value):
        has, prior = olds[i]
        _check(items, item, prior, has, _index(path, i), errors)


def _check_list_type(node: dict[str, Any], value: list[Any], path: str, errors: list[FieldError]) -> None:
    """`x-kubernetes-list-type: set` items and `map` keys are unique: the API server answers each
    repeat with a Duplicate value (apiextensions' listtype validation), before any CEL rule runs."""
    kind = node.get("x-kubernetes-list-type")
    if kind not in ("set", "map"):
        return
    keys = node.get("x-kubernetes-list-map-keys") or []
    seen: list[Any] = []
    for i, item in enumerate(value):
        key = item if kind == "set" else {k: item.get(k) for k in keys if isinstance(item, dict) and k in item}
        if any(same(key, s) for s in seen):
            errors.append(FieldError(_index(path, i), "Duplicate", "", key))
        else:
            seen.append(key)


def _check_value(node: dict[str, Any], value: Any, path: str, errors: list[FieldError]) -> None:
    if "enum" in node and not any(same(value, e) for e in node["enum"]):
        allowed = ", ".join(json.dumps(e) for e in node["enum"])
        errors.append(FieldError(path, "NotSupported", f"supported values: {allowed}", value))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_number(node, value, path, errors)
    if isinstance(value, str):
        _check_string(node, value, path, errors)


def _check_number(node: dict[str, Any], value: float, path: str, errors: list[FieldError]) -> None:
    if "maximum" in node:
        top, strict = node["maximum"], bool(node.get("exclusiveMaximum"))
        if value > top or (strict and value == top):
            word = "less than" if strict else "less than or equal to"
            errors.append(FieldError(path, "Invalid", f"{path} in body should be {word} {_num(top)}", value))
    if "minimum" in node:
        low, strict = node["minimum"], bool(node.get("exclusiveMinimum"))
        if value < low or (strict and value == low):
            word = "greater than" if strict else "greater than or equal to"
            errors.append(FieldError(path, "Invalid", f"{path} in body should be {word} {_num(low)}", value))
    step = node.get("multipleOf")
    if step and (value / step) != int(value / step):
        errors.append(FieldError(path, "Invalid", f"{path} in body should be a multiple of {_num(step)}", value))


def _num(x: float) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def _check_string(node: dict[str, Any], value: str, path: str, errors: list[FieldError]) -> None:
    if "maxLength" in node and len(value) > node["maxLength"]:
        errors.append(FieldError(path, "TooLong", f"may not be more than {node['maxLength']} bytes", value))
    if "minLength" in node and len(value) < node["minLength"]:
        errors.append(FieldError(path, "Invalid", f"{path} in body should be at least {node['minLength']} chars long",
                                 value))
    if "pattern" in node and not re.search(node["pattern"], value):
        errors.append(FieldError(path, "Invalid", f"{path} in body should match '{node['pattern']}'", value))
