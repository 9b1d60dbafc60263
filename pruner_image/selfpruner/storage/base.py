"""The object-store interface: one URI root, '/'-separated keys, complete-then-visible writes.

Every store guarantees that a reader never takes a partially written object for a whole
one: `exists`, `list` and `get_*` only see objects whose write finished. How that is done
is up to the store (a rename for directories, a `.complete` marker for S3).

Keys are relative, '/'-separated paths ("runs/job1/state.json"): no leading '/', no empty,
'.' or '..' segments, no backslashes, and they may not end in one of `RESERVED_SUFFIXES`
(the stores use those names for their own bookkeeping).
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

# `<key>.complete`: the S3 store's completion marker; `*.partial`: a write in progress.
RESERVED_SUFFIXES = (".complete", ".partial")
CHUNK = 1 << 20


class StorageError(Exception):
    """An object store operation failed (network, server, corruption)."""


class ObjectNotFound(StorageError, KeyError):
    """No complete object under this key (it was never written, is still being written,
    or was deleted)."""

    def __init__(self, uri: str, detail: str = ""):
        self.uri = uri
        super().__init__(uri)
        self.message = f"no such object: {uri}" + (f" ({detail})" if detail else "")

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return self.message


class ChecksumMismatch(StorageError):
    """The bytes read do not match the checksum recorded when the object was written."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str


def check_key(key: str) -> str:
    """`key`, if it is a valid object key; ValueError otherwise."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"object key must be a non-empty string, got {key!r}")
    if key.startswith("/") or "\\" in key:
        raise ValueError(f"object key must be a relative '/'-separated path: {key!r}")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"object key has an empty, '.' or '..' segment: {key!r}")
    if key.endswith(RESERVED_SUFFIXES):
        raise ValueError(f"object key may not end in {' or '.join(RESERVED_SUFFIXES)}: {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: '' (everything) or the start of a key (a trailing '/' is allowed)."""
    if prefix == "":
        return prefix
    if not isinstance(prefix, str) or prefix.startswith("/") or "\\" in prefix:
        raise ValueError(f"prefix must be a relative '/'-separated path: {prefix!r}")
    parts = prefix.split("/")
    if parts[-1] == "":
        parts = parts[:-1]
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"prefix has an empty, '.' or '..' segment: {prefix!r}")
    return prefix


def is_reserved(name: str) -> bool:
    return name.endswith(RESERVED_SUFFIXES)


def sha256_file(path: str | os.PathLike) -> tuple[str, int]:
    """(hex sha256, size) of a local file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform lets a directory be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Store(ABC):
    """Objects under one URI root. All methods are safe to call from several threads."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        """Write `data` under `key` (replacing any object there); visible only once whole."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; ObjectNotFound if there is no complete object under `key`."""

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike) -> ObjectInfo:
        """Upload a local file under `key`; visible only once whole."""

    @abstractmethod
    def get_file(self, key: str, path: str | os.PathLike) -> ObjectInfo:
        """Download `key` to the local `path` (parents created). `path` appears only once
        the download is whole and verified; the returned info is what it was checked
        against."""

    @abstractmethod
    def info(self, key: str) -> ObjectInfo:
        """Size and sha256 of a complete object; ObjectNotFound if none."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether a complete object is stored under `key`."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys of the complete objects whose key starts with `prefix` (a plain
        string prefix, as in S3: "runs/a" matches "runs/a/x" and "runs/ab")."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; ObjectNotFound if there is none."""

    @abstractmethod
    def uri(self, key: str = "") -> str:
        """The URI of `key` (the root itself for ''); `open_store(store.uri(p))` is a store
        whose keys are those of this one under `p/`."""

    def origin(self) -> str:
        """Where the bytes really come from, for keys that must not mix two sources: the URI, and
        for S3 the endpoint as well (`s3://models/llama` on two endpoints is two different models)."""
        return self.uri()

    def put_json(self, key: str, obj) -> ObjectInfo:
        return self.put_bytes(key, json.dumps(obj, indent=1).encode())

    def get_json(self, key: str):
        data = self.get_bytes(key)
        try:
            return json.loads(data)
        except ValueError as e:
            raise StorageError(f"{self.uri(key)}: not valid JSON ({e})") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri()!r})"
