"""What a PruneJob may use: the installation's security boundary (the chart's `policy`, handed to
the operator as JSON in SELFPRUNER_POLICY).

A PruneJob names Secrets (`spec.storage.credentialsSecret`, `spec.llm.apiKeySecret`) that its
controller and GPU pods receive, and may name the image those GPU pods run
(`spec.evaluator.image`). Unlimited, whoever may create a PruneJob could read every Secret of
its namespace through an image of their own, or mount any folder of a node. So:

* a Secret is allowed when the installation's `defaults` name it or `policy.allowedSecrets`
  lists it;
* `evaluator.image` is allowed when it is the pruner image or starts with one of
  `policy.allowedImagePrefixes` (write the prefix with its trailing `/`: `registry.example/ml/`);
* `evaluator.nodeCache` (a hostPath) only when `policy.nodeCache.enabled`, and only the path the
  installation set there.

A refusal is the PruneJob's phase `Invalid`, with every reason in one line.
"""

from __future__ import annotations

import os

from selfpruner.errors import UserError

from .defaults import json_env

DEFAULT_NODE_CACHE = "/var/cache/selfpruner"


def load(environ=os.environ) -> dict:
    return json_env(environ, "SELFPRUNER_POLICY", "policy")


def secrets_named(spec: dict) -> list[tuple[str, str]]:
    """(field, Secret name) for every Secret the spec hands to a pod."""
    out = []
    storage = (spec.get("storage") or {}).get("credentialsSecret") or {}
    if storage.get("name"):
        out.append(("spec.storage.credentialsSecret", storage["name"]))
    llm = (spec.get("llm") or {}).get("apiKeySecret") or {}
    if llm.get("name"):
        out.append(("spec.llm.apiKeySecret", llm["name"]))
    return out


def check(spec: dict, policy: dict, installation_defaults: dict, pruner_image: str) -> None:
    """Raise UserError (one line, every problem) when the defaulted spec leaves the boundary."""
    allowed = set(policy.get("allowedSecrets") or [])
    allowed |= {name for _, name in secrets_named(installation_defaults)}
    problems = [f"{field}: Secret {name!r} is not one this installation hands to PruneJobs (ask its admin to add "
                f"it to the chart's policy.allowedSecrets)"
                for field, name in secrets_named(spec) if name not in allowed]
    evaluator = spec.get("evaluator") or {}
    image = evaluator.get("image")
    prefixes = [p for p in policy.get("allowedImagePrefixes") or [] if p]
    if image and image != pruner_image and not any(image.startswith(p) for p in prefixes):
        problems.append(f"spec.evaluator.image: {image!r} is not the pruner image and not from an allowed registry "
                        f"({', '.join(prefixes) or 'none allowed'}; the chart's policy.allowedImagePrefixes)")
    cache = evaluator.get("nodeCache") or ""
    node_cache = policy.get("nodeCache") or {}
    if cache:
        if not node_cache.get("enabled"):
            problems.append("spec.evaluator.nodeCache: this installation does not allow hostPath node caches "
                            "(the chart's policy.nodeCache.enabled); leave it empty")
        elif cache != (node_cache.get("path") or DEFAULT_NODE_CACHE):
            problems.append(f"spec.evaluator.nodeCache: only {node_cache.get('path') or DEFAULT_NODE_CACHE} is "
                            f"allowed (the chart's policy.nodeCache.path), not {cache}")
    if problems:
        raise UserError("; ".join(problems))
