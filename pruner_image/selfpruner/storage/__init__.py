"""Where a run's tasks, results, search state and model weights live: a local folder or S3.

    store = open_store("s3://bucket/runs/job1", endpoint_url="http://minio:9000")
    store.put_json("state.json", {...}); store.get_json("state.json")

Writes are complete-then-visible in every store (see `base`); `node_cache.NodeCache`
brings a model folder from a store to a node's local disk once. boto3 (the `cluster`
extra) is imported only when an s3:// URI is opened.
"""

from __future__ import annotations

import os
import re

from ..errors import UserError
from .base import (ChecksumMismatch, ObjectInfo, ObjectNotFound, StorageError, Store)

__all__ = ["open_store", "Store", "ObjectInfo", "ObjectNotFound", "StorageError", "ChecksumMismatch"]


def open_store(uri: str | os.PathLike, **options) -> Store:
    """The store for `uri`: `s3://bucket/prefix` (options: see `s3.S3Store`), or
    `file:///abs/path` / a plain local path (option: `fsync`; S3 options are ignored, so
    one set of options serves both)."""
    uri = os.fspath(uri)
    scheme = m.group(1).lower() if (m := re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", uri)) else ""
    if scheme == "s3":
        from .s3 import S3Store

        return S3Store(uri, **options)
    if scheme in ("", "file"):
        from .file import FileStore, parse_file_uri
        from .s3 import OPTIONS as S3_OPTIONS

        unknown = set(options) - set(S3_OPTIONS) - {"fsync"}
        if unknown:
            raise UserError(f"unknown store option(s) {sorted(unknown)} for {uri}")
        return FileStore(parse_file_uri(uri), fsync=options.get("fsync", True))
    raise UserError(f"unsupported store URI {uri!r}: use s3://bucket/prefix, file:///abs/path "
                    "or a local path")
