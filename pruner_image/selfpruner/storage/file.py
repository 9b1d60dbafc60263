"""A directory as an object store: `file:///abs/path` or a plain local path.

Complete-then-visible: every write goes to a hidden temporary sibling
(`.<name>.<pid>-<rand>.partial`), is fsynced, then `os.replace`d onto the key's path (an
atomic rename within one folder); the folder is fsynced too. A writer that dies leaves at
most a `.partial` file, which no read or listing ever shows. Keys map to paths below the
root one to one, so a run directory stays readable by hand.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from ..errors import UserError
from ..paths import partial_name
from .base import (CHUNK, ObjectInfo, ObjectNotFound, Store, check_key, check_prefix, fsync_dir,
                   is_reserved, sha256_bytes, sha256_file)


def parse_file_uri(uri: str) -> Path:
    """The folder named by `file:///abs/path` or a plain (relative or absolute) path."""
    if uri.startswith("file:"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise UserError(f"file URI names another host ({parts.netloc!r}): {uri}; "
                            "use file:///absolute/path")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise UserError(f"file URI needs an absolute path (file:///abs/path): {uri}")
        return Path(path)
    return Path(uri).expanduser().absolute()


class FileStore(Store):
    def __init__(self, root: str | os.PathLike, fsync: bool = True):
        self.root = Path(os.path.abspath(os.fspath(root)))
        self.fsync = fsync
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"store root is not a folder: {self.root}")

    # paths -----------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def uri(self, key: str = "") -> str:
        path = self.root if not key else self._path(key)
        return "file://" + quote(str(path))

    # writes ----------------------------------------------------------------------------
    def _write(self, dest: Path, fill) -> None:
        """Create `dest` atomically: `fill(f)` writes the content into a temporary sibling."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial_name(dest)
        try:
            with open(tmp, "wb") as f:
                fill(f)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self.fsync:
            fsync_dir(dest.parent)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        data = bytes(data)
        self._write(self._path(key), lambda f: f.write(data))
        return ObjectInfo(key, len(data), sha256_bytes(data))

    def put_file(self, key: str, path) -> ObjectInfo:
        return _copy(Path(path), self._path(key), key, self._write)

    # reads -----------------------------------------------------------------------------
    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(self.uri(key))
        return path

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(self.uri(key)) from None

    def get_file(self, key: str, path) -> ObjectInfo:
        src = self._existing(key)
        try:
            return _copy(src, Path(path), key, self._write)
        except FileNotFoundError as e:  # deleted meanwhile
            if e.filename == str(src):
                raise ObjectNotFound(self.uri(key)) from None
            raise

    def info(self, key: str) -> ObjectInfo:
        path = self._existing(key)
        digest, size = sha256_file(path)
        return ObjectInfo(key, size, digest)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        # walk only the deepest folder the prefix names
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root.joinpath(*head.split("/")) if head else self.root
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            dirnames[:] = [d for d in dirnames if (rel + d + "/").startswith(prefix)
                           or prefix.startswith(rel + d + "/")]
            for name in filenames:
                key = rel + name
                if key.startswith(prefix) and not is_reserved(name):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            if path.is_dir():
                raise FileNotFoundError
            path.unlink()
        except FileNotFoundError:
            raise ObjectNotFound(self.uri(key)) from None


def _copy(src: Path, dest: Path, key: str, write) -> ObjectInfo:
    """Copy src to dest atomically (through `write`), hashing on the way."""
    h = hashlib.sha256()
    size = 0

    def fill(out):
        nonlocal size
        with open(src, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
                out.write(chunk)

    write(dest, fill)
    return ObjectInfo(key, size, h.hexdigest())

