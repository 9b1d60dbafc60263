"""S3 (AWS, MinIO, any S3-compatible server) as an object store: `s3://bucket/prefix`.

Completion scheme: the data goes to `<prefix>/<key>` (a single PUT, or a multipart upload
above `multipart_threshold`), then a small marker `<prefix>/<key>.complete` is PUT,
holding `{"sha256": ..., "size": ...}` of the data. The marker is the commit point:
`exists`, `list`, `info` and `get_*` only see keys that have one, and every read checks
the bytes it got against it. So a writer that dies after the data but before the
marker leaves nothing visible, and any mismatch between marker and data (a torn
overwrite, a corrupted or foreign-written object) is an error, never silent.
`delete` removes the marker first, so an object disappears before its data does.
Overwrites are last-writer-wins; a reader racing an overwrite can see the new data with
the old marker for a moment, so on a mismatch it re-reads the marker and retries a few
times before reporting `ChecksumMismatch`.

boto3 is imported only when an S3 store is opened; the rest of selfpruner runs without it.
Credentials come from the usual chain (environment, AWS profile, web identity, instance
metadata) unless given explicitly; `endpoint_url` (or `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL` in the environment, which botocore reads itself) points at MinIO & co.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import UserError
from ..paths import partial_name
from .base import (ChecksumMismatch, ObjectInfo, ObjectNotFound, StorageError, Store, check_key,
                   check_prefix, sha256_bytes, sha256_file)

MARKER = ".complete"
MB = 1 << 20

# the options S3Store accepts (open_store drops them for file stores)
OPTIONS = ("endpoint_url", "region", "aws_access_key_id", "aws_secret_access_key",
           "aws_session_token", "profile", "max_attempts", "retry_mode", "connect_timeout",
           "read_timeout", "multipart_threshold", "multipart_chunksize", "max_concurrency",
           "addressing_style", "checksum_calculation", "verify_retries")

NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
# errors the user fixes (configuration, permissions), not transient ones
ACCESS = {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
          "InvalidBucketName", "AllBucketsAreBusy", "AccountProblem", "ExpiredToken",
          "InvalidToken", "PermanentRedirect", "AuthorizationHeaderMalformed", "403"}


_SESSIONS: dict = {}
_SESSIONS_LOCK = threading.Lock()


class StorageAccessError(StorageError, UserError):
    """The store cannot be used as configured (no bucket, no credentials, no permission)."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise UserError(f"not an S3 URI (s3://bucket/prefix): {uri}")
    if parts.query or parts.fragment:
        raise UserError(f"S3 URI may not have a query or fragment: {uri}")
    prefix = parts.path.strip("/")
    if prefix:
        try:
            check_prefix(prefix)
        except ValueError as e:
            raise UserError(f"bad S3 URI {uri}: {e}") from None
    return parts.netloc, prefix


class S3Store(Store):
    def __init__(self, uri: str, *, endpoint_url: str | None = None, region: str | None = None,
                 aws_access_key_id: str | None = None, aws_secret_access_key: str | None = None,
                 aws_session_token: str | None = None, profile: str | None = None,
                 max_attempts: int = 10, retry_mode: str = "standard",
                 connect_timeout: float = 10, read_timeout: float = 60,
                 multipart_threshold: int = 64 * MB, multipart_chunksize: int = 16 * MB,
                 max_concurrency: int = 10, addressing_style: str | None = None,
                 checksum_calculation: str = "when_required", verify_retries: int = 3):
        """`max_attempts` counts the first try (as AWS_MAX_ATTEMPTS does); retries back off
        exponentially (botocore's standard mode: 50 ms base for 5xx, 1 s for throttling).
        `addressing_style` defaults to "path" when an endpoint is given (what MinIO and
        local servers need), else botocore's choice. `checksum_calculation` is botocore's
        request/response checksum setting; "when_required" (not botocore's newer default
        "when_supported") keeps older S3-compatible servers working, and integrity is
        checked end to end with the sha256 in the marker anyway."""
        self.bucket, self.prefix = parse_s3_uri(uri)
        # resolved here (botocore would read these itself) so that an endpoint given only
        # through the environment also gets path-style addressing
        self.endpoint_url = (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                             or os.environ.get("AWS_ENDPOINT_URL") or None)
        self.region = region
        self._credentials = dict(aws_access_key_id=aws_access_key_id,
                                 aws_secret_access_key=aws_secret_access_key,
                                 aws_session_token=aws_session_token)
        self.profile = profile
        self.max_attempts = int(max_attempts)
        self.retry_mode = retry_mode
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        if multipart_chunksize < 5 * MB:
            raise UserError(f"multipart_chunksize must be at least 5 MiB (S3's smallest part), "
                            f"got {multipart_chunksize}")
        self.multipart_threshold = int(multipart_threshold)
        self.multipart_chunksize = int(multipart_chunksize)
        self.max_concurrency = int(max_concurrency)
        self.addressing_style = addressing_style or ("path" if self.endpoint_url else None)
        self.checksum_calculation = checksum_calculation
        self.verify_retries = int(verify_retries)
        self._client = None
        self._transfer = None
        self._client_for_s3()  # fail early (no boto3, bad options), not at the first read

    # the client, built lazily (the store pickles without it, e.g. to a spawned process)
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_client"] = state["_transfer"] = None
        return state

    def _client_for_s3(self):
        if self._client is not None:
            return self._client
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
        except ImportError:
            raise UserError("s3:// stores need boto3: pip install 'selfpruner[cluster]'") from None
        import botocore.exceptions
        import botocore.session
        config = Config(
            # botocore's own "max_attempts" key counts retries only; "total_max_attempts"
            # counts the first try too (as AWS_MAX_ATTEMPTS does), which is what we mean
            retries={"total_max_attempts": self.max_attempts, "mode": self.retry_mode},
            connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
            max_pool_connections=max(10, self.max_concurrency * 2),
            s3={"addressing_style": self.addressing_style} if self.addressing_style else None,
            request_checksum_calculation=self.checksum_calculation,
            response_checksum_validation=self.checksum_calculation,
        )
        self._transfer = TransferConfig(
            multipart_threshold=self.multipart_threshold, multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.max_concurrency, use_threads=True,
            preferred_transfer_client="classic")
        # one botocore session per profile, shared: it caches the (large) S3 service model,
        # so opening a store costs milliseconds; clients are made under a lock because
        # sessions are not thread-safe (the clients themselves are)
        with _SESSIONS_LOCK:
            try:
                if self.profile not in _SESSIONS:
                    core = botocore.session.get_session()
                    if self.profile:
                        core.set_config_variable("profile", self.profile)
                    _SESSIONS[self.profile] = boto3.session.Session(botocore_session=core)
                self._client = _SESSIONS[self.profile].client(
                    "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config,
                    **{k: v for k, v in self._credentials.items() if v})
            except (botocore.exceptions.ProfileNotFound, ValueError) as e:  # ValueError: a bad endpoint URL
                raise UserError(f"cannot open {self.uri()}: {e}") from None
        return self._client

    @property
    def client(self):
        return self._client_for_s3()

    @property
    def transfer_config(self):
        self._client_for_s3()
        return self._transfer

    # keys ------------------------------------------------------------------------------
    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str = "") -> str:
        if key:
            check_key(key)
        path = self._full(key) if key else self.prefix
        return f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"

    def origin(self) -> str:
        return f"{self.endpoint_url or 'aws'}|{self.region or ''}|{self.uri()}"

    @contextmanager
    def _errors(self, op: str, key: str = ""):
        """Turn boto errors into ours, each naming the operation and the object."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        path = self._full(key) if key else self.prefix  # `key` may be a listing prefix
        where = f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"
        try:
            yield
        except ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in NOT_FOUND:
                raise ObjectNotFound(where) from None
            if code in ACCESS:
                raise StorageAccessError(f"{where}: {op} refused ({code}: {err.get('Message', '')})"
                                         f" - check the bucket, endpoint and credentials") from e
            attempts = e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
            raise StorageError(f"{where}: {op} failed with HTTP {status} {code} after "
                               f"{attempts + 1} attempt(s): {err.get('Message', e)}") from e
        except NoCredentialsError as e:
            raise StorageAccessError(f"{where}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                                     "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or pass them)") from e
        except BotoCoreError as e:
            raise StorageError(f"{where}: {op} failed: {e}") from e

    # markers ---------------------------------------------------------------------------
    def _put_marker(self, key: str, size: int, digest: str) -> ObjectInfo:
        body = json.dumps({"sha256": digest, "size": size}).encode()
        with self._errors("writing the completion marker of", key):
            self.client.put_object(Bucket=self.bucket, Key=self._full(key) + MARKER, Body=body,
                                   ContentType="application/json")
        return ObjectInfo(key, size, digest)

    def info(self, key: str) -> ObjectInfo:
        check_key(key)
        with self._errors("reading the completion marker of", key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._full(key) + MARKER)["Body"].read()
        try:
            marker = json.loads(body)
            return ObjectInfo(key, int(marker["size"]), str(marker["sha256"]))
        except (ValueError, KeyError, TypeError):
            raise StorageError(f"{self.uri(key)}: unreadable completion marker {body[:200]!r}") from None

    # writes ----------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        check_key(key)
        data = bytes(data)
        with self._errors("upload", key):
            if len(data) >= self.multipart_threshold:
                import io
                self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._full(key), Config=self.transfer_config)
            else:
                self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data)
        return self._put_marker(key, len(data), sha256_bytes(data))

    def put_file(self, key: str, path) -> ObjectInfo:
        check_key(key)
        digest, size = sha256_file(path)
        with self._errors("upload", key):
            self.client.upload_file(os.fspath(path), self.bucket, self._full(key), Config=self.transfer_config)
        return self._put_marker(key, size, digest)

    # reads -----------------------------------------------------------------------------
    def _verified(self, key: str, read):
        """`read()` the object and check it against its marker; on a mismatch re-read the
        marker (a concurrent overwrite may have landed) and try again a few times."""
        info = self.info(key)
        for attempt in range(self.verify_retries + 1):
            result, digest, size = read(info)
            if (digest, size) == (info.sha256, info.size):
                return result, info
            latest = self.info(key)
            if latest == info and attempt >= 1:
                break  # the marker is stable: the data really does not match it
            info = latest
            time.sleep(0.05 * (attempt + 1))
        raise ChecksumMismatch(
            f"{self.uri(key)}: corrupt object - read {size} bytes with sha256 {digest}, but its "
            f"completion marker records {info.size} bytes with sha256 {info.sha256}")

    def get_bytes(self, key: str) -> bytes:
        def read(info):
            with self._errors("download", key):
                data = self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read()
            return data, sha256_bytes(data), len(data)

        return self._verified(key, read)[0]

    def get_file(self, key: str, path) -> ObjectInfo:
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial_name(dest)

        def read(info):
            with self._errors("download", key):
                self.client.download_file(self.bucket, self._full(key), str(tmp), Config=self.transfer_config)
            digest, size = sha256_file(tmp)
            return None, digest, size

        try:
            _, info = self._verified(key, read)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return info

    def exists(self, key: str) -> bool:
        check_key(key)
        try:
            with self._errors("checking", key):
                self.client.head_object(Bucket=self.bucket, Key=self._full(key) + MARKER)
        except ObjectNotFound:
            return False
        return True

    def _names(self, prefix: str) -> tuple[set[str], int]:
        """Every S3 object name under `prefix` (markers included), and the length of the
        store's own prefix to strip from them."""
        check_prefix(prefix)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        names = set()
        with self._errors("listing", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                names.update(obj["Key"] for obj in page.get("Contents", ()))
        return names, (len(self.prefix) + 1 if self.prefix else 0)

    def list(self, prefix: str = "") -> list[str]:
        names, strip = self._names(prefix)
        return sorted(name[strip:] for name in names
                      if not name.endswith(MARKER) and name + MARKER in names)

    def seal(self, prefix: str = "") -> list[str]:
        """Adopt objects uploaded by other tools (`aws s3 sync`, `mc cp`): give every
        object under `prefix` that has no completion marker one, from its bytes as they
        are now (each is read once). Returns the keys sealed. Only for objects nobody is
        still writing - sealing is a statement that they are whole."""
        names, strip = self._names(prefix)
        sealed = []
        for name in sorted(names):
            if name.endswith(MARKER) or name + MARKER in names or name.endswith("/"):
                continue
            key = check_key(name[strip:])
            h, size = hashlib.sha256(), 0
            with self._errors("reading", key):
                for chunk in self.client.get_object(Bucket=self.bucket, Key=name)["Body"].iter_chunks(1 << 20):
                    h.update(chunk)
                    size += len(chunk)
            self._put_marker(key, size, h.hexdigest())
            sealed.append(key)
        return sealed

    def delete(self, key: str) -> None:
        if not self.exists(key):
            raise ObjectNotFound(self.uri(key))
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._full(key) + MARKER)
            self.client.delete_object(Bucket=self.bucket, Key=self._full(key))
