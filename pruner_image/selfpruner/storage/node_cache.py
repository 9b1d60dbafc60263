"""A node-local copy of a model folder kept in a store, fetched once per node.

    folder = NodeCache("/var/cache/selfpruner").fetch(store, "models/llama-3-8b")

Several processes (the GPU worker pods of one node sharing a hostPath, or several
workers in one pod) may ask for the same prefix at once; exactly one downloads it:

* the finished folder exists  -> returned once the store proves access (below), without a lock;
* otherwise take a file lock for the prefix (`filelock`, an OS lock: a process that dies
  releases it), look again, remove leftovers of a fetch that died, download every object
  under the prefix into a temporary sibling folder (each file checked against the sha256
  in its completion marker by the store's `get_file`), fsync, write a manifest, and
  rename the folder into place - the rename is the commit point, so a folder that exists
  is always whole.

A node's cache is shared by every PruneJob whose pods land there, and its folders are named by
endpoint and URI, not by credentials: a PruneJob naming another tenant's `s3://private/llama`
finds that tenant's copy. So a hit is used only after the caller's store, with the caller's
credentials, lists the prefix, reads every object's completion marker and the bytes of the
smallest object, and all of them match the manifest the download wrote (names, sizes, sha256).
A store that is refused or finds nothing gets `CacheRefused`, and the cache is left as it was.
This costs one listing and one small read per object on each hit, against gigabytes on a miss.

Model prefixes are treated as immutable: a cached folder whose store now holds other bytes is
refused, never silently replaced (upload a changed model under a new prefix). Every listed key
is checked before any folder is made: one that is absolute, has an empty, '.' or '..' segment,
or a NUL, would land outside the cache and is refused (`CacheRefused`). Bytes downloaded are
counted per `NodeCache` object (`bytes_downloaded`) and per node in `<root>/.stats.json`
(`node_bytes_downloaded()`), so a benchmark can check that a node fetched a model at most once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from filelock import FileLock

from ..errors import UserError
from .base import ObjectNotFound, Store, check_key, check_prefix, fsync_dir, sha256_bytes

STATS = ".stats.json"


class NodeCacheError(UserError):
    """The node cache cannot be used at all: a setup fault of the node, not of a candidate."""


class CacheRefused(UserError):
    """This caller does not get the model from the cache: its store cannot prove access to it, the
    store holds other bytes than the cached copy, or a key would land outside the cache."""


def relative_key(key: str, base: str) -> str:
    """`key`'s path under `base`, if it is a safe relative path for a file in the cache; a key
    S3 lists may be anything (`a/../../etc/x`, `/abs`, a NUL), so this runs before any mkdir."""
    rel = key[len(base) + 1:] if base else key
    try:
        if base and not key.startswith(base + "/"):
            raise ValueError(f"not under {base}/")
        if "\0" in key:
            raise ValueError("it has a NUL character")
        check_key(rel)
    except ValueError as e:
        raise CacheRefused(f"object key {key!r} cannot be a file in the node cache: {e}") from None
    return rel


def writable_by(folder: Path, uid: int, groups: list[int]) -> bool:
    """Whether `uid` (in `groups`) may create files in `folder`, from its mode bits (os.access
    answers only for this process, and always yes for root)."""
    st = folder.stat()
    if uid == 0:
        return True
    if st.st_uid == uid:
        return st.st_mode & 0o300 == 0o300
    if st.st_gid in groups:
        return st.st_mode & 0o030 == 0o030
    return st.st_mode & 0o003 == 0o003


class NodeCache:
    def __init__(self, root: str | os.PathLike, lock_timeout: float = -1, *, uid: int | None = None):
        """`lock_timeout` seconds to wait for another process's fetch (-1: for ever); `uid` the
        user the cache must be writable for (this process's)."""
        self.root = Path(root).absolute()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise NodeCacheError(f"node cache {self.root}: cannot create it ({e.strerror})") from None
        uid = os.getuid() if uid is None else uid
        groups = [os.getgid(), *os.getgroups()] if uid == os.getuid() else []
        if not writable_by(self.root, uid, groups):
            # a hostPath made by the kubelet as root (type DirectoryOrCreate) is not writable by our uid
            raise NodeCacheError(f"node cache {self.root} is not writable by uid {uid}; make the node's "
                                 f"folder writable for that uid (e.g. chown {uid} on each node)")
        self.lock_timeout = lock_timeout
        self.bytes_downloaded = 0  # by this object
        self.files_downloaded = 0

    def path_for(self, store: Store, prefix: str) -> Path:
        """The cache folder of `prefix` in `store`: readable name, unique hash of the endpoint and
        URI (a node cache shared by PruneJobs must not hand one of them a model fetched by another
        from a different endpoint with the same bucket name)."""
        prefix = check_prefix(prefix).strip("/")
        source = store.origin() + "|" + prefix
        tail = re.sub(r"[^A-Za-z0-9._-]+", "_", prefix.rsplit("/", 1)[-1] or "root").lstrip(".")[:60]
        return self.root / f"{tail or 'root'}-{hashlib.sha256(source.encode()).hexdigest()[:16]}"

    def fetch(self, store: Store, prefix: str) -> Path:
        """The local folder holding every object under `prefix/` (keys relative to it)."""
        try:
            base = check_prefix(prefix).strip("/")
        except ValueError as e:
            raise CacheRefused(f"model prefix {prefix!r}: {e}") from None
        final = self.path_for(store, base)
        if final.is_dir():
            return self._proven(store, base, final)
        with FileLock(str(final) + ".lock", timeout=self.lock_timeout):
            if final.is_dir():  # another process finished while we waited
                return self._proven(store, base, final)
            listing = self._listing(store, base)  # every key checked before anything is made
            for stale in self.root.glob(final.name + ".tmp-*"):  # a fetch that died
                shutil.rmtree(stale, ignore_errors=True)
            tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
            try:
                manifest = self._download(store, base, listing, tmp)
                record = final.with_name(final.name + ".json")
                record_tmp = final.with_name(final.name + ".json.partial")
                record_tmp.write_text(json.dumps(manifest, indent=1))
                os.replace(record_tmp, record)
                os.replace(tmp, final)
                fsync_dir(self.root)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        return final

    @staticmethod
    def _listing(store: Store, base: str) -> dict[str, str]:
        """{path in the cache folder: key} of every object under `base/`, each path checked."""
        keys = store.list(base + "/" if base else "")
        if not keys:
            raise ObjectNotFound(store.uri(base) + "/", "nothing stored under this prefix; objects "
                                 "uploaded by other tools need completion markers: S3Store.seal(prefix)")
        return {relative_key(key, base): key for key in keys}

    def _proven(self, store: Store, base: str, final: Path) -> Path:
        """`final`, once `store` (the caller's credentials) shows it may read what the folder holds:
        the listing, every object's size and sha256, and the smallest object's bytes all match the
        manifest. Otherwise CacheRefused, and nothing in the cache changes."""
        source = store.uri(base) if base else store.uri()
        try:
            cached = json.loads(final.with_name(final.name + ".json").read_text())["files"]
            sizes = {rel: int(f["size"]) for rel, f in cached.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CacheRefused(f"node cache {final} has no readable manifest; remove that folder on the node") from None
        try:
            listing = self._listing(store, base)
            changed = sorted(set(listing) ^ set(cached))
            for rel in sorted(set(listing) - set(changed)):
                info = store.info(listing[rel])
                if (info.size, info.sha256) != (sizes[rel], cached[rel]["sha256"]):
                    changed.append(rel)
            if not changed:
                smallest = min(listing, key=lambda rel: (sizes[rel], rel))
                if sha256_bytes(store.get_bytes(listing[smallest])) != cached[smallest]["sha256"]:
                    changed.append(smallest)
        except (ObjectNotFound, UserError) as e:  # UserError: StorageAccessError, refused by the store
            raise CacheRefused(f"{source}: this node has a cached copy, but this PruneJob's store cannot "
                               f"read the model ({' '.join(str(e).split())})") from None
        if changed:
            raise CacheRefused(f"{source} holds other objects than this node's cached copy ({', '.join(changed[:3])}"
                               f"{' ...' if len(changed) > 3 else ''}); model prefixes are immutable: upload a "
                               "changed model under a new prefix")
        return final

    def _download(self, store: Store, base: str, listing: dict[str, str], tmp: Path) -> dict:
        tmp.mkdir(parents=True)
        files = {}
        for rel, key in listing.items():
            dest = tmp.joinpath(*rel.split("/"))
            info = store.get_file(key, dest)  # verified against the object's marker
            if dest.stat().st_size != info.size:
                raise OSError(f"{dest}: size changed after download")
            with open(dest, "rb") as f:
                os.fsync(f.fileno())
            files[rel] = {"size": info.size, "sha256": info.sha256}
            self.bytes_downloaded += info.size
            self.files_downloaded += 1
            self._count(info.size)
        for folder in {p.parent for p in tmp.rglob("*")} | {tmp}:
            fsync_dir(folder)
        return {"source": store.uri(base) if base else store.uri(), "files": files}

    def _count(self, nbytes: int) -> None:
        stats = self.root / STATS
        with FileLock(str(stats) + ".lock"):
            try:
                data = json.loads(stats.read_text())
            except (FileNotFoundError, ValueError):
                data = {"bytes_downloaded": 0, "files_downloaded": 0}
            data["bytes_downloaded"] += nbytes
            data["files_downloaded"] += 1
            tmp = stats.with_name(STATS + ".partial")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, stats)

    def node_bytes_downloaded(self) -> int:
        """Bytes every NodeCache on this root has downloaded, all processes together."""
        try:
            return json.loads((self.root / STATS).read_text())["bytes_downloaded"]
        except (FileNotFoundError, ValueError, KeyError):
            return 0

    def manifest(self, store: Store, prefix: str) -> dict:
        """What a finished fetch recorded: source URI and each file's size and sha256."""
        final = self.path_for(store, prefix)
        return json.loads(final.with_name(final.name + ".json").read_text())
