"""The storage layer: one contract for both stores, complete-then-visible writes, S3
multipart/ranged transfers with checksums, retries through injected 5xx, and the node cache.

S3 tests run against moto's real server in its own process (tests/s3_server.py)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ports import free_port
from s3_server import FaultProxy, s3_bucket, s3_client, s3_endpoint  # noqa: F401  (fixtures)

from selfpruner.errors import UserError
from selfpruner.storage import ChecksumMismatch, ObjectNotFound, StorageError, Store, open_store
from selfpruner.storage.node_cache import NodeCache

MB = 1 << 20
FAST = dict(max_attempts=3, connect_timeout=2, read_timeout=10)  # keep failing tests quick


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "file":
        return open_store(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(bucket + "/some/prefix", endpoint_url=endpoint, **FAST)


# ---- the contract, for both stores ------------------------------------------------------

def test_bytes_round_trip_and_overwrite(store):
    info = store.put_bytes("a/b/c.bin", b"hello")
    assert (info.size, info.sha256) == (5, hashlib.sha256(b"hello").hexdigest())
    assert store.get_bytes("a/b/c.bin") == b"hello"
    assert store.info("a/b/c.bin") == info
    store.put_bytes("a/b/c.bin", b"")  # overwrite, and empty objects work
    assert store.get_bytes("a/b/c.bin") == b""
    assert store.exists("a/b/c.bin") and not store.exists("a/b/c") and not store.exists("a/b")


def test_file_round_trip(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(100_000))
    store.put_file("m/weights.bin", src)
    dest = tmp_path / "out" / "deep" / "w.bin"  # parents are created
    info = store.get_file("m/weights.bin", dest)
    assert dest.read_bytes() == src.read_bytes()
    assert info.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert [p.name for p in dest.parent.iterdir()] == ["w.bin"]  # no temporary left behind


def test_json(store):
    state = {"generation": 3, "rates": [0.1, 0.25], "name": "ünïcode"}
    store.put_json("state.json", state)
    assert store.get_json("state.json") == state
    store.put_bytes("bad.json", b"{not json")
    with pytest.raises(StorageError, match="not valid JSON"):
        store.get_json("bad.json")


def test_list(store):
    for key in ["runs/a/1.json", "runs/a/2.json", "runs/ab/x", "runs/b/deep/y", "top"]:
        store.put_bytes(key, key.encode())
    assert store.list() == ["runs/a/1.json", "runs/a/2.json", "runs/ab/x", "runs/b/deep/y", "top"]
    assert store.list("runs/a/") == ["runs/a/1.json", "runs/a/2.json"]
    assert store.list("runs/a") == ["runs/a/1.json", "runs/a/2.json", "runs/ab/x"]  # a plain prefix
    assert store.list("runs/b/deep/") == ["runs/b/deep/y"]
    assert store.list("nothing/") == [] and store.list("runs/c") == []


def test_delete(store):
    store.put_bytes("x/1", b"1")
    store.put_bytes("x/2", b"2")
    store.delete("x/1")
    assert not store.exists("x/1") and store.list("x/") == ["x/2"]
    with pytest.raises(ObjectNotFound):
        store.get_bytes("x/1")
    with pytest.raises(ObjectNotFound):
        store.delete("x/1")


def test_missing_keys(store, tmp_path):
    for call in (lambda: store.get_bytes("no/such"), lambda: store.get_json("no/such"),
                 lambda: store.get_file("no/such", tmp_path / "f"), lambda: store.info("no/such")):
        with pytest.raises(KeyError) as e:  # ObjectNotFound is a KeyError
            call()
        assert isinstance(e.value, ObjectNotFound)
        assert str(e.value) == f"no such object: {store.uri('no/such')}"
    assert not (tmp_path / "f").exists()
    assert not store.exists("no/such")


def test_bad_keys(store):
    for key in ["", "/abs", "a//b", "a/../b", "./a", "a\\b", "x.complete", "y.partial"]:
        for call in (lambda: store.put_bytes(key, b"x"), lambda: store.get_bytes(key),
                     lambda: store.exists(key)):
            with pytest.raises(ValueError):
                call()
    for prefix in ["/abs", "a//", "../x"]:
        with pytest.raises(ValueError):
            store.list(prefix)


def test_uri_opens_a_sub_store(store, s3_endpoint):
    store.put_bytes("sub/dir/k", b"v")
    sub = open_store(store.uri("sub"), endpoint_url=s3_endpoint, **FAST)
    assert sub.get_bytes("dir/k") == b"v" and sub.list() == ["dir/k"]
    assert sub.uri("dir/k") == store.uri("sub/dir/k")


# ---- open_store ---------------------------------------------------------------------------

def test_open_store_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = open_store("rel/dir")
    assert rel.uri() == (tmp_path / "rel" / "dir").as_uri()
    rel.put_bytes("k", b"1")
    assert open_store((tmp_path / "rel" / "dir").as_uri()).get_bytes("k") == b"1"
    assert open_store(f"file://{tmp_path}/rel/dir", endpoint_url="ignored").get_bytes("k") == b"1"
    for bad in ["gs://bucket/x", "s3://", "file://otherhost/x", "s3://b/a/../c"]:
        with pytest.raises(UserError):
            open_store(bad)
    with pytest.raises(UserError, match="unknown store option"):
        open_store(tmp_path, endpoint="x")
    with pytest.raises(UserError, match="Invalid endpoint"):
        open_store("s3://b", endpoint_url="not a url")
    with pytest.raises(UserError, match="multipart_chunksize"):
        open_store("s3://b", multipart_chunksize=1024)


def test_core_does_not_import_boto3(tmp_path):
    code = ("import sys; from selfpruner.storage import open_store; "
            f"open_store({str(tmp_path)!r}).put_bytes('k', b'v'); "
            "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules; "
            "assert not any(m.startswith(('kopf', 'kubernetes')) for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- partial objects are never visible -----------------------------------------------------

def test_file_store_hides_leftover_temporaries(tmp_path):
    store = open_store(tmp_path)
    store.put_bytes("m/done.bin", b"whole")
    # what a writer killed mid-write leaves: a temporary sibling, never renamed into place
    (tmp_path / "m" / ".half.bin.4242-deadbeef.partial").write_bytes(b"hal")
    assert store.list() == ["m/done.bin"]
    assert not store.exists("m/half.bin")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("m/half.bin")


def test_file_store_failed_write_leaves_old_object(tmp_path, monkeypatch):
    store = open_store(tmp_path)
    store.put_bytes("k", b"old")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.put_bytes("k", b"new")
    monkeypatch.undo()
    assert store.get_bytes("k") == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]


def test_s3_data_without_marker_is_invisible(s3_bucket, s3_endpoint, tmp_path):
    store = open_store(s3_bucket + "/p", endpoint_url=s3_endpoint, **FAST)
    store.put_bytes("done", b"whole")
    # a writer that crashed after uploading the data, before the .complete marker
    s3_client(s3_endpoint).put_object(Bucket=store.bucket, Key="p/crashed", Body=b"all the data")
    assert store.list() == ["done"]
    assert not store.exists("crashed")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("crashed")
    with pytest.raises(ObjectNotFound):
        store.get_file("crashed", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    # the marker is the commit point: once written, the object appears
    marker = {"sha256": hashlib.sha256(b"all the data").hexdigest(), "size": 12}
    s3_client(s3_endpoint).put_object(Bucket=store.bucket, Key="p/crashed.complete", Body=json.dumps(marker))
    assert store.get_bytes("crashed") == b"all the data"


def test_s3_seal_adopts_foreign_uploads(s3_bucket, s3_endpoint, monkeypatch):
    client = s3_client(s3_endpoint)
    bucket = s3_bucket[len("s3://"):]
    client.put_object(Bucket=bucket, Key="models/m/config.json", Body=b"{}")  # e.g. `aws s3 sync`
    client.put_object(Bucket=bucket, Key="models/m/w.bin", Body=b"weights")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # the endpoint from the environment alone
    store = open_store(s3_bucket + "/models", **FAST)
    assert store.addressing_style == "path" and store.list() == []
    assert store.seal("m/") == ["m/config.json", "m/w.bin"]
    assert store.list() == ["m/config.json", "m/w.bin"] and store.get_bytes("m/w.bin") == b"weights"
    assert store.seal() == []  # already sealed


# ---- large files: multipart upload, ranged parallel download, checksums ---------------------

def test_s3_multipart_and_ranged_download(s3_bucket, s3_endpoint, tmp_path):
    with FaultProxy(s3_endpoint) as proxy:  # no faults: it just logs the requests
        store = open_store(s3_bucket, endpoint_url=proxy.url, multipart_threshold=5 * MB,
                           multipart_chunksize=5 * MB, **FAST)
        src = tmp_path / "big.bin"
        src.write_bytes(os.urandom(6 * MB + 123))
        info = store.put_file("model/big.bin", src)
        uploads = [r for r in proxy.requests if r[0] == "PUT" and "partNumber=" in r[1]]
        assert len(uploads) == 2  # 5 MiB + the rest
        proxy.requests.clear()
        out = tmp_path / "out.bin"
        assert store.get_file("model/big.bin", out) == info
        ranges = sorted(r[2] for r in proxy.requests if r[0] == "GET" and r[2])
        assert len(ranges) == 2, proxy.requests  # two ranged GETs
        assert out.read_bytes() == src.read_bytes()
        assert store.get_bytes("model/big.bin") == src.read_bytes()


def test_s3_corruption_is_detected(s3_bucket, s3_endpoint, tmp_path):
    store = open_store(s3_bucket, endpoint_url=s3_endpoint, multipart_threshold=5 * MB,
                       multipart_chunksize=5 * MB, **FAST)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(6 * MB))
    store.put_file("model/big.bin", src)
    store.put_bytes("small", b"abc")
    client = s3_client(s3_endpoint)
    bad = bytearray(src.read_bytes())
    bad[3 * MB] ^= 1  # one flipped bit, same size
    client.put_object(Bucket=store.bucket, Key="model/big.bin", Body=bytes(bad))
    client.put_object(Bucket=store.bucket, Key="small", Body=b"abcd")
    out = tmp_path / "out.bin"
    with pytest.raises(ChecksumMismatch, match=r"model/big\.bin: corrupt object"):
        store.get_file("model/big.bin", out)
    assert not out.exists() and list(tmp_path.iterdir()) == [src]  # nothing half-written left
    with pytest.raises(ChecksumMismatch, match="read 4 bytes .* records 3 bytes"):
        store.get_bytes("small")


# ---- retries through 5xx -------------------------------------------------------------------

def test_s3_retries_through_server_errors(s3_bucket, s3_endpoint, tmp_path):
    with FaultProxy(s3_endpoint) as proxy:
        store = open_store(s3_bucket, endpoint_url=proxy.url, max_attempts=6, multipart_threshold=5 * MB,
                           multipart_chunksize=5 * MB)
        proxy.fail(4)
        store.put_bytes("a", b"payload")  # 4 failures, then data + marker
        proxy.fail(3)
        assert store.get_bytes("a") == b"payload"
        proxy.fail(2, status=503)
        assert store.list() == ["a"]
        src = tmp_path / "big.bin"
        src.write_bytes(os.urandom(6 * MB))
        proxy.fail(2)
        store.put_file("big", src)  # multipart
        proxy.fail(2)
        store.get_file("big", tmp_path / "back.bin")  # ranged
        assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
        assert sum(1 for r in proxy.requests if r[3] >= 500) == 13


def test_s3_too_many_server_errors(s3_bucket, s3_endpoint):
    with FaultProxy(s3_endpoint) as proxy:
        store = open_store(s3_bucket, endpoint_url=proxy.url, max_attempts=3)
        proxy.fail(100)
        start = time.monotonic()
        with pytest.raises(StorageError, match=r"upload failed with HTTP 500 InternalError after 3 attempt"):
            store.put_bytes("a", b"payload")
        assert time.monotonic() - start < 5
        assert len(proxy.requests) == 3
        with pytest.raises(StorageError, match="after 3 attempt"):
            store.get_bytes("a")
        proxy.fail(0)
        assert not store.exists("a")  # the failed write left nothing visible


def test_s3_unreachable_and_missing_bucket(s3_endpoint):
    port = free_port()  # nothing listens here
    store = open_store("s3://b", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=2, connect_timeout=1)
    with pytest.raises(StorageError, match="s3://b/k: upload failed: Could not connect"):
        store.put_bytes("k", b"v")
    store = open_store("s3://no-such-bucket-here", endpoint_url=s3_endpoint, **FAST)
    with pytest.raises(UserError, match="NoSuchBucket"):
        store.put_bytes("k", b"v")


# ---- the node cache ------------------------------------------------------------------------

def _fetch_worker(store_uri, endpoint, cache_root, prefix, barrier, queue):
    store = open_store(store_uri, endpoint_url=endpoint, multipart_threshold=5 * MB, multipart_chunksize=5 * MB)
    cache = NodeCache(cache_root)
    barrier.wait()
    path = cache.fetch(store, prefix)
    queue.put((str(path), cache.bytes_downloaded, cache.files_downloaded))


def _model_folder(store, tmp_path) -> dict[str, bytes]:
    files = {"config.json": b'{"layers": 2}', "model-00001.safetensors": os.urandom(6 * MB),
             "model-00002.safetensors": os.urandom(MB), "tokenizer/vocab.txt": b"a\nb\n"}
    for name, data in files.items():
        path = tmp_path / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        store.put_file(f"models/tiny/{name}", path)
    store.put_bytes("models/tiny2/other", b"not part of models/tiny")
    return files


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_node_cache_two_processes_download_once(s3_bucket, s3_endpoint, tmp_path):
    store = open_store(s3_bucket, endpoint_url=s3_endpoint, multipart_threshold=5 * MB,
                       multipart_chunksize=5 * MB, **FAST)
    files = _model_folder(store, tmp_path)
    size = sum(len(d) for d in files.values())
    root = tmp_path / "node-cache"
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_fetch_worker, args=(s3_bucket, s3_endpoint, root, "models/tiny", barrier, queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    paths = {r[0] for r in results}
    assert len(paths) == 1  # both got the same folder
    assert sorted(r[1] for r in results) == [0, size]  # one downloaded everything, the other nothing
    assert sorted(r[2] for r in results) == [0, len(files)]
    folder = Path(paths.pop())
    assert _tree(folder) == files  # complete and identical, no stray files
    cache = NodeCache(root)
    assert cache.node_bytes_downloaded() == size  # <= 1.0 x the model per node
    assert cache.manifest(store, "models/tiny")["files"]["config.json"]["sha256"] == \
        hashlib.sha256(files["config.json"]).hexdigest()
    # later fetches return the cached folder and download nothing
    assert cache.fetch(store, "models/tiny/") == folder and cache.bytes_downloaded == 0
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == \
        sorted([folder.name, folder.name + ".json", ".stats.json"])


def test_node_cache_recovers_from_a_dead_fetch_and_rejects_corruption(s3_bucket, s3_endpoint, tmp_path):
    store = open_store(s3_bucket, endpoint_url=s3_endpoint, **FAST)
    files = _model_folder(store, tmp_path)
    cache = NodeCache(tmp_path / "cache")
    final = cache.path_for(store, "models/tiny")
    stale = final.with_name(final.name + ".tmp-999-dead")  # what a killed fetch leaves
    (stale / "half").mkdir(parents=True)
    client = s3_client(s3_endpoint)
    client.put_object(Bucket=store.bucket, Key="models/tiny/config.json", Body=b'{"layers": 3}')
    with pytest.raises(ChecksumMismatch, match="config.json"):
        cache.fetch(store, "models/tiny")
    assert not final.exists() and not stale.exists()
    assert not list(final.parent.glob(final.name + ".tmp-*"))  # nothing half-fetched left behind
    client.put_object(Bucket=store.bucket, Key="models/tiny/config.json", Body=files["config.json"])
    assert _tree(cache.fetch(store, "models/tiny")) == files
    with pytest.raises(ObjectNotFound, match="nothing stored under this prefix"):
        cache.fetch(store, "models/absent")


def test_node_cache_with_a_file_store(tmp_path):
    store = open_store(tmp_path / "store")
    files = _model_folder(store, tmp_path)
    cache = NodeCache(tmp_path / "cache")
    folder = cache.fetch(store, "models/tiny")
    assert _tree(folder) == files and cache.bytes_downloaded == sum(map(len, files.values()))


def test_controller_finds_the_newest_whole_checkpoint_when_latest_is_torn(s3_endpoint, s3_bucket):
    """A controller killed while rewriting state/latest.json leaves data that does not match
    its completion marker; the next controller falls back to the numbered checkpoints."""
    from s3_server import s3_client
    from selfpruner.cluster.controller import _latest_checkpoint
    from selfpruner.cluster.layout import Layout
    from selfpruner.storage import open_store

    store = open_store(s3_bucket, endpoint_url=s3_endpoint)
    bucket = s3_bucket.removeprefix("s3://")
    layout = Layout("uid-1")
    assert _latest_checkpoint(store, layout) == 0
    for n in (1, 2, 3):
        store.put_json(layout.state("state.json", n), {"n": n})
    store.put_json(layout.latest_state, {"checkpoint": 2})
    assert _latest_checkpoint(store, layout) == 2
    # the torn rewrite: new bytes landed, the marker still describes the old ones
    s3_client(s3_endpoint).put_object(Bucket=bucket, Key=layout.latest_state, Body=b'{"checkpoint": 3')
    assert _latest_checkpoint(store, layout) == 3


def test_node_cache_keys_include_the_endpoint(tmp_path):
    """Two PruneJobs naming the same bucket and prefix on different endpoints share a node's
    hostPath cache: neither may be handed the other's model."""
    cache = NodeCache(tmp_path / "cache")
    ours = open_store("s3://models", endpoint_url="http://minio.storage:9000")
    theirs = open_store("s3://models", endpoint_url="http://evil.example:9000")
    assert cache.path_for(ours, "llama") != cache.path_for(theirs, "llama")
    assert cache.path_for(ours, "llama") == cache.path_for(open_store("s3://models", endpoint_url="http://minio.storage:9000"), "llama")
    assert cache.path_for(open_store(tmp_path / "a"), "m") != cache.path_for(open_store(tmp_path / "b"), "m")


def test_node_cache_not_writable_says_so_in_one_line(tmp_path):
    """A hostPath the kubelet made as root (DirectoryOrCreate) is not writable by the pods' uid
    (10001): the first use says so, in one line, before any download."""
    root = tmp_path / "cache"
    root.mkdir(mode=0o755)
    other = os.getuid() + 4242  # not the folder's owner
    with pytest.raises(UserError, match=rf"^node cache {root} is not writable by uid {other}; .*chown {other}"):
        NodeCache(root, uid=other)
    root.chmod(0o777)
    assert NodeCache(root, uid=other).root == root  # writable for all: fine
    root.chmod(0o755)
    assert NodeCache(root, uid=os.getuid()).root == root  # its owner: fine


def test_the_controller_does_not_import_torch():
    """The controller pod runs the search loop and submits Jobs; the model runs in the workers.
    Without torch and transformers it starts in a fraction of a second and needs far less memory
    (a local LLM as the search's operator imports them when it loads)."""
    code = ("import sys; import selfpruner.cluster.controller; "
            "heavy = {'torch', 'transformers', 'selfpruner.engine'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_worker_does_not_import_the_search_loop():
    """A GPU worker evaluates candidates; it builds its executor from the spec, not from the
    search loop (nor the LLM clients the loop drives)."""
    code = ("import sys; import selfpruner.cluster.worker; "
            "loaded = [m for m in sys.modules if m.startswith('selfpruner.search')]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
