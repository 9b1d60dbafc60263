"""Authentication by bearer token and RBAC authorization, as kube-apiserver does them.

Without it every request is allowed, so a missing verb in the chart's Roles, or a tenant's identity
reaching another tenant's objects, shows up only on a real cluster. A request without a bearer token
is the test itself (an administrator, as `system:masters`); a request with a token made by
`Tokens.issue` acts as that identity and gets exactly what the stored Roles, ClusterRoles and their
bindings grant it (`rbac.authorization.k8s.io/v1`, ClusterRole aggregation included); anything else
is 403 `Forbidden`, with the server's message. An unknown token is 401.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
from typing import Any, Iterable

RBAC = "rbac.authorization.k8s.io"


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...]

    @classmethod
    def anonymous(cls) -> "User":
        return cls("system:anonymous", ("system:unauthenticated",))

    @classmethod
    def service_account(cls, namespace: str, name: str) -> "User":
        return cls(f"system:serviceaccount:{namespace}:{name}",
                   ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"))


class Tokens:
    """The token authenticator: bearer token -> User. Thread-safe (tests issue tokens from their thread)."""

    def __init__(self) -> None:
        self._users: dict[str, User] = {}
        self._lock = threading.Lock()

    def issue(self, user: User) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._users[token] = user
        return token

    def user(self, authorization: str | None) -> User | None | bool:
        """The request's User; None for no bearer token (the administrator); False for a token
        nobody issued (401)."""
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        with self._lock:
            return self._users.get(authorization[7:].strip(), False)


def verb(method: str, name: str | None, watch: bool) -> str:
    if method == "GET":
        return "watch" if watch else ("get" if name else "list")
    return {"POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete" if name else "deletecollection"}.get(method, method.lower())


def _subject_is(subject: dict[str, Any], user: User, binding_ns: str | None) -> bool:
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "ServiceAccount":
        return user.name == f"system:serviceaccount:{subject.get('namespace') or binding_ns}:{name}"
    if kind == "User":
        return user.name == name
    if kind == "Group":
        return name in user.groups
    return False


def _rule_allows(rule: dict[str, Any], verb_: str, group: str, resource: str, name: str | None) -> bool:
    if not ({"*", verb_} & set(rule.get("verbs") or [])):
        return False
    if not ({"*", group} & set(rule.get("apiGroups") or [])):
        return False
    base, _, sub = resource.partition("/")
    wanted = {"*", resource} | ({f"*/{sub}", f"{base}/*"} if sub else set())
    if not (wanted & set(rule.get("resources") or [])):
        return False
    names = rule.get("resourceNames") or []
    return not names or (name is not None and name in names)


def _labels_match(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _rules_of(role: dict[str, Any], cluster_roles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A role's rules; an aggregated ClusterRole's are those of the ClusterRoles its selectors pick
    (what the aggregation controller writes into it)."""
    aggregation = role.get("aggregationRule")
    if not aggregation:
        return list(role.get("rules") or [])
    out = []
    for other in cluster_roles:
        labels = other["metadata"].get("labels") or {}
        if other is not role and any(_labels_match(s, labels) for s in aggregation.get("clusterRoleSelectors") or []):
            out += other.get("rules") or []
    return out


def allowed(objects: Iterable[tuple[str, str | None, dict[str, Any]]], user: User, verb_: str, group: str,
            resource: str, namespace: str | None, name: str | None) -> bool:
    """Whether `user` may do it, by the RBAC objects in `objects` ((plural, namespace, object) of
    the rbac.authorization.k8s.io group)."""
    by_kind: dict[str, list[tuple[str | None, dict[str, Any]]]] = {}
    for plural, ns, obj in objects:
        by_kind.setdefault(plural, []).append((ns, obj))
    cluster_roles = [o for _, o in by_kind.get("clusterroles", [])]
    roles = {(ns, o["metadata"]["name"]): o for ns, o in by_kind.get("roles", [])}
    bindings = [(None, b) for _, b in by_kind.get("clusterrolebindings", [])]
    if namespace is not None:
        bindings += [(ns, b) for ns, b in by_kind.get("rolebindings", []) if ns == namespace]
    for binding_ns, binding in bindings:
        if not any(_subject_is(s, user, binding_ns) for s in binding.get("subjects") or []):
            continue
        ref = binding.get("roleRef") or {}
        if ref.get("kind") == "ClusterRole":
            role = next((r for r in cluster_roles if r["metadata"]["name"] == ref.get("name")), None)
        else:
            role = roles.get((binding_ns, ref.get("name")))
        if role is not None and any(_rule_allows(rule, verb_, group, resource, name)
                                    for rule in _rules_of(role, cluster_roles)):
            return True
    return False


def forbidden_message(user: User, verb_: str, group: str, resource: str, namespace: str | None,
                      name: str | None) -> str:
    base = resource.partition("/")[0]
    what = f"{base}.{group}" if group else base
    what += f' "{name}"' if name else ""
    where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    return (f'{what} is forbidden: User "{user.name}" cannot {verb_} resource "{resource}" in API group '
            f'"{group}" {where}')
