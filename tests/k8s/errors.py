"""Field errors in the API server's shape: one `field.Error` per problem, rendered as
`spec.x: Invalid value: 2: detail`, and the 422 `Invalid` Status that lists them."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

MISSING = object()

# kind -> (the text Go's field.ErrorType prints, the Status cause's reason)
KINDS = {
    "Invalid": ("Invalid value", "FieldValueInvalid"),
    "TypeInvalid": ("Invalid value", "FieldValueTypeInvalid"),
    "Required": ("Required value", "FieldValueRequired"),
    "NotSupported": ("Unsupported value", "FieldValueNotSupported"),
    "Forbidden": ("Forbidden", "FieldValueForbidden"),
    "TooLong": ("Too long", "FieldValueTooLong"),
    "TooMany": ("Too many", "FieldValueTooMany"),
    "Duplicate": ("Duplicate value", "FieldValueDuplicate"),
}
VALUELESS = {"Required", "Forbidden", "TooLong"}   # Go prints no value for these


def render(value: Any) -> str:
    """A value as Go's field errors print it: strings quoted, integral floats without `.0`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return repr(value)
    if value is None:
        return '"null"'
    return json.dumps(value, separators=(",", ":"))


@dataclasses.dataclass
class FieldError:
    field: str
    kind: str
    detail: str = ""
    value: Any = MISSING

    def body(self) -> str:
        text = KINDS[self.kind][0]
        if self.kind not in VALUELESS and self.value is not MISSING:
            text += f": {render(self.value)}"
        if self.detail:
            text += f": {self.detail}"
        return text

    def __str__(self) -> str:
        return f"{self.field}: {self.body()}" if self.field else self.body()

    def cause(self) -> dict[str, Any]:
        return {"reason": KINDS[self.kind][1], "message": self.body(), "field": self.field}


class ApiError(Exception):
    """An error answer: its HTTP code and the Status object the server sends."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict[str, Any]:
        body = {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            body["details"] = self.details
        return body


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def invalid_status(kind: str, group: str, name: str, errors: list[FieldError]) -> tuple[str, dict[str, Any]]:
    """The message and details of a 422 Invalid, as `errors.NewInvalid` writes them:
    `Kind.group "name" is invalid: [a, b]` (no brackets for a single error)."""
    qualified = f"{kind}.{group}" if group else kind
    listed = [str(e) for e in errors]
    text = listed[0] if len(listed) == 1 else "[" + ", ".join(listed) + "]"
    details = {"name": name, "group": group, "kind": kind, "causes": [e.cause() for e in errors]}
    return f'{qualified} "{name}" is invalid: {text}', details
