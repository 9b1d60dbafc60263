"""The installation's defaults: what a platform team sets once in the chart (`defaults` in
values.yaml, handed to the operator as JSON in SELFPRUNER_DEFAULTS) so that a PruneJob need not
repeat its S3 store or LLM endpoint.

A PruneJob's own fields always win. `storage` is taken whole when the PruneJob has none (merging
field by field could pair the PruneJob's bucket with another store's endpoint). For `llm`, only
the endpoint and its key Secret are filled, and only for `provider: openai`: the API server has
already defaulted `provider` and `model` from the CRD, so the operator cannot tell them apart
from what the user wrote."""

from __future__ import annotations

import copy
import json
import os

LLM_FIELDS = ("baseURL", "apiKeySecret")


def load(environ=os.environ) -> dict:
    text = environ.get("SELFPRUNER_DEFAULTS") or "{}"
    try:
        defaults = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"SELFPRUNER_DEFAULTS is not JSON ({e}); fix the chart's `defaults` value") from None
    if not isinstance(defaults, dict) or not all(isinstance(defaults.get(k, {}), dict) for k in ("storage", "llm")):
        raise SystemExit('SELFPRUNER_DEFAULTS must be {"storage": {...}, "llm": {...}}; fix the chart\'s `defaults`')
    return defaults


def apply(spec: dict, defaults: dict) -> tuple[dict, list[str]]:
    """The spec with the defaults filled in, and the dotted names of the fields that came from them."""
    spec, used = copy.deepcopy(dict(spec)), []
    if not spec.get("storage") and (defaults.get("storage") or {}).get("uri"):
        spec["storage"] = copy.deepcopy(defaults["storage"])
        used.append("storage")
    llm = spec.get("llm") or {}
    if llm.get("provider") == "openai":
        for field in LLM_FIELDS:
            if field not in llm and field in (defaults.get("llm") or {}):
                llm[field] = copy.deepcopy(defaults["llm"][field])
                used.append(f"llm.{field}")
        spec["llm"] = llm
    return spec, used
