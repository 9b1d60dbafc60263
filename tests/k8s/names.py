"""ObjectMeta validation as kube-apiserver does it for every object (names, labels,
annotations, owner references, finalizers), and the batch/v1 Job name rules
(pkg/apis/batch/validation: the name becomes a 63-character label value of the pod template,
and an Indexed Job's last pod hostname `<name>-<completions-1>` must be a DNS-1123 label)."""

from __future__ import annotations

import re
from typing import Any

from .errors import FieldError

LABEL_RE = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
SUBDOMAIN_RE = LABEL_RE + r"(\." + LABEL_RE + r")*"
DNS1035_RE = r"[a-z]([-a-z0-9]*[a-z0-9])?"
NAME_PART_RE = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
LABEL_VALUE_RE = r"(" + NAME_PART_RE + r")?"
MAX_ANNOTATIONS = 256 * 1024
MAX_GENERATED_BASE = 58     # generateName is cut so that base + 5 random characters fit 63

SUBDOMAIN_MSG = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
                 "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
                 f"validation is '{SUBDOMAIN_RE}')")
LABEL_MSG = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
             f"start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for "
             f"validation is '{LABEL_RE}')")
DNS1035_MSG = ("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
               "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', "
               f"regex used for validation is '{DNS1035_RE}')")
NAME_PART_MSG = ("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with "
                 "an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
                 f"validation is '{NAME_PART_RE}')")
LABEL_VALUE_MSG = ("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
                   "and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or "
                   f"'12345', regex used for validation is '{LABEL_VALUE_RE}')")


def _full(pattern: str, value: str) -> bool:
    return re.fullmatch(pattern, value) is not None


def subdomain(value: str) -> list[str]:
    out = ["must be no more than 253 characters"] if len(value) > 253 else []
    return out + ([] if _full(SUBDOMAIN_RE, value) else [SUBDOMAIN_MSG])


def label(value: str) -> list[str]:
    out = ["must be no more than 63 characters"] if len(value) > 63 else []
    return out + ([] if _full(LABEL_RE, value) else [LABEL_MSG])


def dns1035(value: str) -> list[str]:
    out = ["must be no more than 63 characters"] if len(value) > 63 else []
    return out + ([] if _full(DNS1035_RE, value) else [DNS1035_MSG])


def qualified_name(key: str) -> list[str]:
    """A label or annotation key: an optional DNS-subdomain prefix and '/', then a name part."""
    parts = key.split("/")
    if len(parts) > 2:
        return ["a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must start and "
                "end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
                f"validation is '{NAME_PART_RE}') with an optional DNS subdomain prefix and '/' (e.g. "
                "'example.com/MyName')"]
    name = parts[-1]
    out = []
    if len(parts) == 2:
        if not parts[0]:
            out.append("prefix part must be non-empty")
        else:
            out.extend("prefix part " + m for m in subdomain(parts[0]))
    if not name:
        out.append("name part must be non-empty")
    elif len(name) > 63:
        out.append("name part must be no more than 63 characters")
    if name and not _full(NAME_PART_RE, name):
        out.append(NAME_PART_MSG)
    return out


def label_value(value: Any) -> list[str]:
    if not isinstance(value, str):
        return [LABEL_VALUE_MSG]
    out = ["must be no more than 63 characters"] if len(value) > 63 else []
    return out + ([] if _full(LABEL_VALUE_RE, value) else [LABEL_VALUE_MSG])


def name_rule(group: str, plural: str):
    """Which name validation the kind uses (most: DNS-1123 subdomain)."""
    if group == "" and plural == "namespaces":
        return label
    if group == "" and plural == "services":
        return dns1035
    return subdomain


def generated_name(base: str, suffix: str) -> str:
    return base[:MAX_GENERATED_BASE] + suffix


def validate_labels(labels: Any, path: str) -> list[FieldError]:
    errors = []
    for key, value in (labels or {}).items():
        errors += [FieldError(path, "Invalid", m, key) for m in qualified_name(key)]
        errors += [FieldError(path, "Invalid", m, value) for m in label_value(value)]
    return errors


def validate_annotations(annotations: Any, path: str) -> list[FieldError]:
    errors = []
    size = 0
    for key, value in (annotations or {}).items():
        errors += [FieldError(path, "Invalid", m, key) for m in qualified_name(key.lower())]
        size += len(key) + len(value if isinstance(value, str) else str(value))
    if size > MAX_ANNOTATIONS:
        errors.append(FieldError(path, "TooLong", f"must have at most {MAX_ANNOTATIONS} bytes"))
    return errors


def validate_owners(refs: Any) -> list[FieldError]:
    errors = []
    for ref in refs or []:
        for field in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(field):
                detail = {"uid": "uid must not be empty", "name": "name must not be empty",
                          "kind": "kind must not be empty", "apiVersion": "version must not be empty"}[field]
                errors.append(FieldError(f"metadata.ownerReferences.{field}", "Invalid", detail, ref.get(field, "")))
    controllers = [r for r in refs or [] if r.get("controller")]
    if len(controllers) > 1:
        errors.append(FieldError("metadata.ownerReferences", "Invalid", "Only one reference can have Controller "
                                 f"set to true. Found \"true\" in references for {len(controllers)} owners",
                                 refs))
    return errors


def validate_meta(group: str, plural: str, obj: dict[str, Any]) -> list[FieldError]:
    """ObjectMeta of any object, on create and update."""
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    errors = [FieldError("metadata.name", "Invalid", m, name) for m in name_rule(group, plural)(name)]
    if group == "apiextensions.k8s.io" and plural == "customresourcedefinitions":
        spec = obj.get("spec") or {}
        want = f"{(spec.get('names') or {}).get('plural')}.{spec.get('group')}"
        if name != want:
            errors.append(FieldError("metadata.name", "Invalid", 'must be spec.names.plural+"."+spec.group', name))
    errors += validate_labels(meta.get("labels"), "metadata.labels")
    errors += validate_annotations(meta.get("annotations"), "metadata.annotations")
    errors += validate_owners(meta.get("ownerReferences"))
    for i, fin in enumerate(meta.get("finalizers") or []):
        errors += [FieldError(f"metadata.finalizers[{i}]", "Invalid", m, fin) for m in qualified_name(fin)]
    return errors


def validate_job(job: dict[str, Any]) -> list[FieldError]:
    """batch/v1 Job names: the server puts the name in the pod template's `job-name` and
    `batch.kubernetes.io/job-name` labels (63 characters at most), and for an Indexed Job it
    requires the hostname of the last pod, `<name>-<completions-1>`, to be a DNS-1123 label."""
    name = job["metadata"].get("name", "")
    spec = job.get("spec") or {}
    errors = []
    if len(name) > 63:
        errors += [FieldError("spec.template.labels", "Invalid", "must be no more than 63 characters", name)] * 2
    completions = spec.get("completions")
    if spec.get("completionMode") == "Indexed" and isinstance(completions, int) and completions > 0:
        hostname = f"{name}-{completions - 1}"
        if label(hostname):
            errors.append(FieldError("metadata.name", "Invalid",
                                     f"will not able to create pod with invalid DNS label: {hostname}", name))
    return errors
