"""The CRD's `x-kubernetes-validations` rules, run with cel-python as kube-apiserver runs them
with cel-go: `self` is the node's value (after defaulting), typed by the schema (a `number` is a
double even when written `0`); a transition rule (one that mentions `oldSelf`) runs only on an
update and only where the old object had the node; a value unchanged since the old object is not
checked again (ratcheting)."""

from __future__ import annotations

import json
from typing import Any

import celpy
from celpy import celtypes

from .errors import FieldError, join_path

ENV = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}
REASONS = {"FieldValueInvalid": "Invalid", "FieldValueForbidden": "Forbidden",
           "FieldValueRequired": "Required", "FieldValueDuplicate": "Duplicate"}


def program(rule: str) -> Any:
    """Compiled once per rule text (compiling is the slow part of cel-python)."""
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = ENV.program(ENV.compile(rule))
    return _PROGRAMS[rule]


def compile_errors(schema: Any, path: str = "openAPIV3Schema") -> list[FieldError]:
    """The rules that do not compile: the server refuses such a CRD, so a broken rule never
    reaches a custom resource."""
    if not isinstance(schema, dict):
        return []
    errors = []
    for i, rule in enumerate(schema.get("x-kubernetes-validations") or []):
        try:
            program(rule.get("rule", ""))
        except Exception as e:  # noqa: BLE001 - any parse error is the rule's
            errors.append(FieldError(f"{path}.x-kubernetes-validations[{i}].rule", "Invalid",
                                     f"compilation failed: {str(e).splitlines()[0]}", rule.get("rule")))
    for key, sub in (schema.get("properties") or {}).items():
        errors.extend(compile_errors(sub, f"{path}.properties[{key}]"))
    for key in ("items", "additionalProperties"):
        errors.extend(compile_errors(schema.get(key), f"{path}.{key}"))
    return errors


def to_cel(node: dict[str, Any] | None, value: Any) -> Any:
    """A JSON value as CEL sees it under this schema node."""
    node = node or {}
    kind = node.get("type")
    if value is None:
        return None
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if kind == "number" and isinstance(value, (int, float)):
        return celtypes.DoubleType(float(value))
    if kind == "integer" and isinstance(value, (int, float)):
        return celtypes.IntType(int(value))
    if isinstance(value, dict):
        props, extra = node.get("properties") or {}, node.get("additionalProperties")
        return celtypes.MapType({celtypes.StringType(k): to_cel(props.get(k, extra if isinstance(extra, dict)
                                                                           else None), v)
                                 for k, v in value.items()})
    if isinstance(value, list):
        return celtypes.ListType([to_cel(node.get("items"), v) for v in value])
    return celpy.json_to_cel(value)


def type_name(node: dict[str, Any], value: Any) -> str:
    """What the server prints as the invalid value of a failed rule: the node's type."""
    if node.get("type"):
        return node["type"]
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(value), "number")


def _error_text(err: Any) -> str:
    """cel-python's wording of cel-go's runtime errors."""
    text = str(err.args[0]) if getattr(err, "args", None) else str(err)
    if text.startswith("no such member in mapping: "):
        return "no such key: " + text.split(": ", 1)[1].strip("'")
    return text


def _failure(rule: dict[str, Any], node: dict[str, Any], value: Any, path: str, activation: dict[str, Any]) \
        -> FieldError:
    message = rule.get("message", "").strip() or f"failed rule: {rule['rule'].strip()}"
    if rule.get("messageExpression"):
        try:
            message = str(program(rule["messageExpression"]).evaluate(activation)) or message
        except Exception:  # noqa: BLE001 - the server falls back to message too
            pass
    field = path + rule.get("fieldPath", "") if rule.get("fieldPath") else path
    return FieldError(field, REASONS.get(rule.get("reason", ""), "Invalid"), message, type_name(node, value))


def check_rules(node: dict[str, Any], value: Any, old: Any, has_old: bool, path: str) -> list[FieldError]:
    """The rules of one node."""
    errors = []
    for rule in node.get("x-kubernetes-validations") or []:
        text = rule["rule"]
        transition = "oldSelf" in text
        if transition and not has_old:
            continue
        activation = {"self": to_cel(node, value)}
        if transition:
            activation["oldSelf"] = to_cel(node, old)
        try:
            result = program(text).evaluate(activation)
        except celpy.CELEvalError as e:
            result = e
        if isinstance(result, celpy.CELEvalError):
            reason = rule.get("message", "").strip() or text.strip()
            errors.append(FieldError(path, "Invalid", f"{_error_text(result)} evaluating rule: {reason}",
                                     type_name(node, value)))
        elif not bool(result):
            errors.append(_failure(rule, node, value, path, activation))
    return errors


def correlate(node: dict[str, Any], value: list[Any], old: list[Any] | None) -> list[tuple[bool, Any]]:
    """The old item of each new item: only a `x-kubernetes-list-type: map` list correlates, by its
    keys (an atomic list has no old items; its transition rules do not run)."""
    keys = node.get("x-kubernetes-list-map-keys") or []
    if old is None or node.get("x-kubernetes-list-type") != "map" or not keys:
        return [(False, None)] * len(value)

    def key(item: Any) -> str:
        return json.dumps([item.get(k) for k in keys]) if isinstance(item, dict) else ""
    by_key = {key(o): o for o in old}
    return [(key(v) in by_key, by_key.get(key(v))) for v in value]


def check_tree(node: dict[str, Any], value: Any, old: Any, has_old: bool, path: str) -> list[FieldError]:
    """The rules of a node and of everything below it."""
    if has_old and json.dumps(value, sort_keys=True) == json.dumps(old, sort_keys=True):
        return []
    errors = check_rules(node, value, old, has_old, path) if value is not None else []
    if isinstance(value, dict):
        props, extra = node.get("properties") or {}, node.get("additionalProperties")
        olds = old if has_old and isinstance(old, dict) else {}
        for key, sub_value in value.items():
            sub = props.get(key) or (extra if isinstance(extra, dict) else None)
            if sub is not None:
                sub_path = join_path(path, key) if key in props else f"{path}[{key}]"
                errors.extend(check_tree(sub, sub_value, olds.get(key), key in olds, sub_path))
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        pairs = correlate(node, value, old if has_old and isinstance(old, list) else None)
        for i, item in enumerate(value):
            errors.extend(check_tree(node["items"], item, pairs[i][1], pairs[i][0], f"{path}[{i}]"))
    return errors
