"""Reading what an LLM replied: candidates, parent choices and edits, as JSON, or salvaged from a
reply that ignored its schema (an endpoint without structured outputs)."""

from __future__ import annotations

import json
import re

NUMBER_LIST = re.compile(r"\[\s*-?\d+(?:\.\d*)?(?:\s*,\s*-?\d+(?:\.\d*)?)*\s*\]")


def parse_candidates(text: str) -> list | None:
    """The list of candidates in a reply, or None if there is nothing usable.

    Proper JSON first; failing that (an endpoint that ignored the schema), every complete
    list of numbers in the text is salvaged."""
    found = _parse_json(text)
    if found is not None:
        return found
    salvaged = [json.loads(m) for m in NUMBER_LIST.findall(text)]
    return salvaged or None


def _parse_json(text: str) -> list | None:
    text = text.strip()
    text = re.sub(r"^```(?:json)?|```$", "", text, flags=re.MULTILINE).strip()
    for opener, closer in (("{", "}"), ("[", "]")):
        start, end = text.find(opener), text.rfind(closer)
        if start == -1 or end <= start:
            continue
        try:
            data = json.loads(text[start:end + 1])
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and not {"attention", "mlp"} <= data.keys():
            data = data.get("candidates", data.get("children", data.get("mutants")))
        elif isinstance(data, dict):
            return [data]  # a single bare candidate with separate rates
        if isinstance(data, list) and data and all(isinstance(c, (list, dict)) for c in data):
            return data
        if isinstance(data, list) and data and all(isinstance(v, (int, float)) for v in data):
            return [data]  # a single bare candidate
    return None


def parse_selection(text: str) -> dict | None:
    data = first_object(text)
    return data if isinstance(data, dict) else None


def first_object(text: str):
    start, end = text.find("{"), text.rfind("}")
    if start == -1 or end <= start:
        return None
    try:
        return json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None
