"""JSON patches (RFC 6902), merge patches (RFC 7386) and the strategic-merge subset kubectl sends."""

from __future__ import annotations

import copy
from typing import Any

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
