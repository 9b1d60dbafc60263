"""The node cache as an attack surface: a GPU node's hostPath cache is shared by every PruneJob
whose pods land there, so it must hand a cached model only to a caller whose own credentials can
read it, and a crafted object key must never make it write outside its root.

Access is enforced for real: this module runs its own moto S3 server with IAM authorization on
(moto's INITIAL_NO_AUTH_ACTION_COUNT: the first requests, which create the buckets, users and
their policies, pass unchecked; every request after is checked against the caller's IAM policy),
so tenant A's requests for tenant B's bucket get S3's own AccessDenied.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
from s3_server import start_moto

from selfpruner.storage import open_store
from selfpruner.storage.node_cache import CacheRefused, NodeCache

# start_moto's readiness probe, two buckets, and per user: create, attach a policy, an access key
SETUP_REQUESTS = 1 + 2 + 3 * 3


@pytest.fixture(scope="module")
def iam_s3(tmp_path_factory):
    """(endpoint, {user: credentials}, bucket of B, bucket of A) on an S3 server that checks IAM:
    b owns the private bucket, a has only its own bucket, c may read b's bucket (a second tenant
    b shared the model with)."""
    import boto3

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INITIAL_NO_AUTH_ACTION_COUNT", str(SETUP_REQUESTS))
        proc, url = start_moto(tmp_path_factory.mktemp("moto-iam") / "moto.log")
    try:
        admin = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing")
        s3, iam = boto3.client("s3", **admin), boto3.client("iam", **admin)
        private, own = f"private-{uuid.uuid4().hex[:8]}", f"tenant-a-{uuid.uuid4().hex[:8]}"
        s3.create_bucket(Bucket=private)
        s3.create_bucket(Bucket=own)
        rights = {"b": (private, ["s3:*"]), "a": (own, ["s3:*"]), "c": (private, ["s3:Get*", "s3:List*"])}
        users = {}
        for user, (bucket, actions) in rights.items():
            iam.create_user(UserName=user)
            policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": [
                f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}
            iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(policy))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            users[user] = {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}
        yield url, users, private, own
    finally:
        proc.terminate()
        proc.wait(10)


def store_of(iam_s3, user: str, bucket: str):
    url, users, *_ = iam_s3
    return open_store(f"s3://{bucket}", endpoint_url=url, region="us-east-1", max_attempts=2, **users[user])


MODEL = {"config.json": b'{"model_type": "llama"}', "model.safetensors": os.urandom(300_000),
         "tokenizer.json": b'{"version": "1.0"}'}


def upload(store, prefix: str) -> None:
    for name, data in MODEL.items():
        store.put_bytes(f"{prefix}/{name}", data)


def snapshot(root):
    """Every path under the cache root with its bytes (files) - what 'untouched' means."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*")) if not p.name.endswith(".lock")}


def test_tenant_a_cannot_read_tenant_bs_cached_model(iam_s3, tmp_path):
    _, _, private, _ = iam_s3
    b = store_of(iam_s3, "b", private)
    prefix = f"llama-{uuid.uuid4().hex[:6]}"
    upload(b, prefix)
    cache = NodeCache(tmp_path / "node-cache")
    folder = cache.fetch(b, prefix)  # tenant B's pod fills the node's cache
    before = snapshot(cache.root)

    a = store_of(iam_s3, "a", private)  # tenant A names B's model, with A's own credentials
    assert cache.path_for(a, prefix) == folder  # the same cache folder: only access decides
    with pytest.raises(CacheRefused) as refused:
        cache.fetch(a, prefix)
    message = str(refused.value)
    assert "\n" not in message and "cannot read the model" in message and "AccessDenied" in message
    assert snapshot(cache.root) == before  # nothing copied, nothing removed
    assert cache.bytes_downloaded == sum(map(len, MODEL.values()))  # B's one download, nothing for A

    c = store_of(iam_s3, "c", private)  # a tenant B shared the bucket with gets the cached copy
    fresh = NodeCache(cache.root)
    assert fresh.fetch(c, prefix) == folder and fresh.bytes_downloaded == 0
    assert snapshot(cache.root) == before


def test_a_deleted_or_changed_model_is_refused_from_the_cache(iam_s3, tmp_path):
    """The cached copy is handed out only while the store holds the same objects: one deleted
    (the owner withdrew it) or changed (prefixes are immutable) and the hit is refused."""
    _, _, private, _ = iam_s3
    b = store_of(iam_s3, "b", private)
    prefix = f"llama-{uuid.uuid4().hex[:6]}"
    upload(b, prefix)
    cache = NodeCache(tmp_path / "node-cache")
    cache.fetch(b, prefix)
    before = snapshot(cache.root)
    b.put_bytes(f"{prefix}/config.json", b'{"model_type": "mistral"}')
    with pytest.raises(CacheRefused, match="holds other objects than this node's cached copy .config.json"):
        cache.fetch(b, prefix)
    b.delete(f"{prefix}/config.json")
    with pytest.raises(CacheRefused, match="holds other objects .*config.json"):
        cache.fetch(b, prefix)
    for name in MODEL:
        if b.exists(f"{prefix}/{name}"):
            b.delete(f"{prefix}/{name}")
    with pytest.raises(CacheRefused, match="cannot read the model .no such object"):
        cache.fetch(b, prefix)
    assert snapshot(cache.root) == before


def test_a_dot_dot_key_in_s3_is_refused_before_any_folder_is_made(iam_s3, tmp_path):
    """S3 keys are any string: `evil/../../../../escape/x` is a valid object name. Joined to the
    cache's temporary folder it points four levels up; it must be refused before any mkdir."""
    url, users, private, _ = iam_s3
    b = store_of(iam_s3, "b", private)
    prefix = f"evil-{uuid.uuid4().hex[:6]}"
    b.put_bytes(f"{prefix}/config.json", b"{}")
    # the crafted object and its completion marker, written around the store (which refuses such keys)
    raw = b.client
    raw.put_object(Bucket=private, Key=f"{prefix}/../../../../escape/x", Body=b"pwned")
    raw.put_object(Bucket=private, Key=f"{prefix}/../../../../escape/x.complete",
                   Body=json.dumps({"sha256": "0" * 64, "size": 5}).encode())
    assert f"{prefix}/../../../../escape/x" in b.list(prefix + "/")  # S3 really holds and lists it
    root = tmp_path / "a" / "b" / "node-cache"
    cache = NodeCache(root)
    with pytest.raises(CacheRefused, match=r"cannot be a file in the node cache: .*'\.\.' segment"):
        cache.fetch(b, prefix)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no tmp_path/escape
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []  # not even a temporary folder


@pytest.mark.parametrize("bad", ["m//abs", "m/a\0b", "m/./x", "m/../x"])
def test_keys_that_would_land_outside_the_cache_are_refused_first(tmp_path, bad):
    """A file store cannot hold such names and S3 servers differ in what they accept, so the
    listing is faked here: the store lists one good key and one crafted `bad` key."""
    store = open_store(tmp_path / "store")
    store.put_bytes("m/config.json", b"{}")
    store.list = lambda prefix="": ["m/config.json", bad]
    root = tmp_path / "cache"
    with pytest.raises(CacheRefused, match="cannot be a file in the node cache"):
        NodeCache(root).fetch(store, "m")
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "store"]


@pytest.mark.parametrize("prefix", ["../models", "/abs", "a/../b"])
def test_a_bad_model_prefix_is_one_line_and_makes_nothing(tmp_path, prefix):
    root = tmp_path / "cache"
    with pytest.raises(CacheRefused, match="model prefix"):
        NodeCache(root).fetch(open_store(tmp_path / "store"), prefix)
    assert list(root.iterdir()) == []
