"""A real S3 server for tests: moto's server in its own process, over HTTP on 127.0.0.1.

In a test module:

    from s3_server import s3_endpoint, s3_bucket  # noqa: F401  (pytest fixtures)

    def test_x(s3_bucket, s3_endpoint):
        store = open_store(s3_bucket, endpoint_url=s3_endpoint)

`s3_endpoint` (session) starts the server once and sets dummy AWS credentials in the
environment (so boto3 anywhere in the test, and in processes it spawns, finds them);
`s3_bucket` makes a fresh bucket per test and gives its `s3://` URI. `FaultProxy` sits
between a client and the server and answers the first N requests with an error, to test
retries (moto itself cannot inject faults).
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ports import PortTaken, address_in_use, free_port, start_listening

DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait for instance metadata
    "AWS_CONFIG_FILE": os.devnull,  # ignore the developer's ~/.aws
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
UNSET_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
             "AWS_ENDPOINT_URL_S3")


def start_moto(log_path) -> tuple[subprocess.Popen, str]:
    return start_listening(lambda: _start_moto(log_path))


def _start_moto(log_path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in UNSET_ENV} | DUMMY_ENV
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            if address_in_use(open(log_path).read()):
                raise PortTaken(url)
            raise RuntimeError(f"moto server exited with {proc.returncode}:\n{open(log_path).read()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/", timeout=1).read()
            return proc, url
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not answer on {url}:\n{open(log_path).read()[-3000:]}")
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """The URL of a moto S3 server (its own process) with dummy credentials in the env."""
    proc, url = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    with pytest.MonkeyPatch.context() as mp:
        for name in UNSET_ENV:
            mp.delenv(name, raising=False)
        for name, value in DUMMY_ENV.items():
            mp.setenv(name, value)
        try:
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def s3_client(endpoint: str):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}))


def make_bucket(endpoint: str, name: str | None = None) -> str:
    name = name or f"test-{uuid.uuid4().hex[:12]}"
    s3_client(endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """`s3://<a new, empty bucket>` on the moto server."""
    return f"s3://{make_bucket(s3_endpoint)}"


class FaultProxy:
    """An HTTP proxy in front of `upstream` answering the next `fail(n)` requests with
    `status` (an S3-style error body) and forwarding the rest. `requests` logs every
    request as (method, path, Range header or None, answered status)."""

    HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
           "proxy-connection", "content-length"}

    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://").rstrip("/")
        self.failures_left = 0
        self.status = 500
        self.requests: list[tuple[str, str, str | None, int]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += chunk
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                with proxy.lock:
                    fail = proxy.failures_left > 0
                    if fail:
                        proxy.failures_left -= 1
                if fail:
                    reply = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                             b"<Message>injected failure</Message></Error>")
                    self.send_response(proxy.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(reply)
                    self._log(proxy.status)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in proxy.HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in proxy.HOP:
                        self.send_header(k, v)
                if self.command == "HEAD":
                    self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()
                self._log(resp.status)

            def _log(self, status):
                with proxy.lock:
                    proxy.requests.append((self.command, self.path, self.headers.get("Range"), status))

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def fail(self, n: int, status: int = 500) -> None:
        with self.lock:
            self.failures_left = n
            self.status = status

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
