"""The installation's defaults: what a platform team sets once in the chart (`defaults` in
values.yaml, handed to the operator as JSON in SELFPRUNER_DEFAULTS) so that a PruneJob need not
repeat its S3 store or LLM endpoint.

A PruneJob's own fields always win. `storage` is taken whole when the PruneJob has none (merging
field by field could pair the PruneJob's bucket with another store's endpoint). The LLM endpoint
is taken the same way: only for `provider: openai`, and only when the PruneJob names no
`baseURL` of its own; then the endpoint comes with its key Secret. A PruneJob that names its own
endpoint gets nothing from the installation, above all not its key: the controller sends the key
as a Bearer token to whatever URL it is given. (`provider` and `model` are not filled: the API
server has already defaulted them from the CRD, so the operator cannot tell them from what the
user wrote.)"""

from __future__ import annotations

import copy
import json
import os

LLM_FIELDS = ("baseURL", "apiKeySecret")


def json_env(environ, name: str, value: str) -> dict:
    """A chart value handed to the operator as JSON in an environment variable; a bad one stops the
    operator at startup with one line naming the chart value to fix."""
    try:
        data = json.loads(environ.get(name) or "{}")
    except json.JSONDecodeError as e:
        raise SystemExit(f"{name} is not JSON ({e}); fix the chart's `{value}` value") from None
    if not isinstance(data, dict):
        raise SystemExit(f"{name} must be a JSON object; fix the chart's `{value}` value")
    return data


def load(environ=os.environ) -> dict:
    defaults = json_env(environ, "SELFPRUNER_DEFAULTS", "defaults")
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
    installed = defaults.get("llm") or {}
    if llm.get("provider") == "openai" and not llm.get("baseURL") and installed.get("baseURL"):
        for field in LLM_FIELDS:  # the installation's endpoint, with its key if the PruneJob brings none
            if field not in llm and field in installed:
                llm[field] = copy.deepcopy(installed[field])
                used.append(f"llm.{field}")
        spec["llm"] = llm
    return spec, used
