"""A local S3 server for the tests: moto's standalone server in a subprocess, checking
signatures against an IAM key it issued, and a proxy in front of it that answers 503 on
demand. Nothing leaves 127.0.0.1. The fixtures using them are in conftest.py."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest

REGION = "us-east-1"
BUCKET = "codistill-tests"
START_SECONDS = 30.0
ALLOW_S3 = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


@dataclass
class S3Server:
    """A running moto server: its endpoint, the key it checks signatures with, a bucket."""

    url: str
    key: str
    secret: str
    bucket: str
    process: subprocess.Popen
    log: str

    def client(self) -> Any:
        """A boto3 S3 client of this server, with its key."""
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name=REGION, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(proc: subprocess.Popen, port: int, log: str) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    proc.kill()
    proc.wait()
    with open(log, errors="replace") as f:
        tail = f.read()[-2000:]
    pytest.fail(f"the local S3 server (python -m moto.server on 127.0.0.1:{port}) did not start within "
                f"{START_SECONDS:g} s (exit code {proc.returncode}); its output:\n{tail}", pytrace=False)


def _issue_key(url: str) -> tuple[str, str]:
    """An IAM user allowed s3:* and its access key, made while the server still takes unsigned
    requests; from then on it checks every signature (moto's /moto-api/reset-auth)."""
    import boto3

    iam = boto3.client("iam", endpoint_url=url, region_name=REGION, aws_access_key_id="AKIAMOTOBOOTSTRAP000",
                       aws_secret_access_key="bootstrap")
    iam.create_user(UserName="codistill")
    iam.put_user_policy(UserName="codistill", PolicyName="s3", PolicyDocument=json.dumps(ALLOW_S3))
    key = iam.create_access_key(UserName="codistill")["AccessKey"]
    conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=10)
    conn.request("POST", "/moto-api/reset-auth", body=b"0", headers={"Content-Type": "text/plain"})
    if (response := conn.getresponse()).status != 200:
        raise RuntimeError(f"moto's reset-auth answered {response.status}: {response.read()[:200]!r}")
    conn.close()
    return key["AccessKeyId"], key["SecretAccessKey"]


def start_server(log: str) -> S3Server:
    """moto's S3 server on a free local port, signatures checked, with the bucket ``BUCKET``;
    the calling test fails (not skips) if it cannot start."""
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as e:
        pytest.fail(f"the S3 tests need moto[server] and boto3 ({e}): pip install -e '.[dev,s3]'",
                    pytrace=False)
    port = _free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    _wait_listening(proc, port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        key, secret = _issue_key(url)
        server = S3Server(url, key, secret, BUCKET, proc, log)
        server.client().create_bucket(Bucket=BUCKET)
    except Exception as e:
        proc.kill()
        proc.wait()
        pytest.fail(f"the local S3 server on {url} started but could not be set up: {e}", pytrace=False)
    return server


@dataclass
class Faults:
    """Requests the proxy fails: ``{method: how many of the next ones}``, and what it served."""

    pending: dict[str, int] = field(default_factory=dict)
    served: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path, status)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, method: str) -> bool:
        with self.lock:
            if self.pending.get(method, 0) > 0:
                self.pending[method] -= 1
                return True
            return False

    def record(self, method: str, path: str, status: int) -> None:
        with self.lock:
            self.served.append((method, path, status))


class FaultyProxy(ThreadingHTTPServer):
    """An HTTP proxy on a free local port forwarding to ``target`` (the Host header and body
    untouched, so signatures still match), except that it answers the next ``n`` requests of
    a method with S3's 503 ServiceUnavailable after :meth:`fail`."""

    daemon_threads = True

    def __init__(self, target: str) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.target = urlsplit(target).netloc
        self.faults = Faults()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, name="s3-proxy", daemon=True)
        self._thread.start()

    def fail(self, method: str, n: int) -> None:
        with self.faults.lock:
            self.faults.pending[method] = n

    def statuses(self, method: str) -> list[int]:
        with self.faults.lock:
            return [status for m, _, status in self.faults.served if m == method]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultyProxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _relay(self) -> None:
        body = self._body()
        if self.server.faults.take(self.command):
            self._answer(503, {"Content-Type": "application/xml"},
                         b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable</Code>"
                         b"<Message>injected by the test proxy</Message></Error>")
            return
        upstream = http.client.HTTPConnection(self.server.target, timeout=30)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP | {"content-length"}:
                    upstream.putheader(name, value)
            upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body)
            response = upstream.getresponse()
            data = response.read()
            headers = {k: v for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP}
        finally:
            upstream.close()
        self._answer(response.status, headers, data)

    def _answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
        self.server.faults.record(self.command, self.path, status)
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() != "content-length" or self.command == "HEAD":
                self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            if not any(k.lower() == "content-length" for k in headers):
                self.send_header("Content-Length", "0")
            self.end_headers()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay
