"""Label and field selectors, as the API server evaluates them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

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
