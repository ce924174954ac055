"""The router's AWS clients give up after two attempts: the timeouts table in docs/router.md
("connect 1 s, read 2 s, 2 attempts") is what a failing endpoint costs a message."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import botocore.exceptions
import pytest

from fabric.bootstrap import _boto3_client


class _Failing(BaseHTTPRequestHandler):
    requests = 0

    def do_POST(self) -> None:
        type(self).requests += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"__type": "InternalFailure", "message": "down"}'
        self.send_response(500)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        return


@pytest.fixture
def failing_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Failing]]:
    _Failing.requests = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-southeast-3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    yield _Failing
    server.shutdown()
    server.server_close()


def test_a_failing_endpoint_is_tried_twice_then_the_error_is_the_routers(
    failing_endpoint: type[_Failing],
) -> None:
    kms = _boto3_client("kms")
    with pytest.raises(botocore.exceptions.ClientError):
        kms.generate_data_key(KeyId="alias/x", KeySpec="AES_256")
    assert failing_endpoint.requests == 2
