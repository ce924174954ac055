"""Management API DELETEs whose answer is lost, on the real local RabbitMQ behind a loopback
proxy: the retry finds the object gone because the lost attempt deleted it."""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fabric.adapters.management import ManagementClient

pytestmark = pytest.mark.integration

UPSTREAM = ("127.0.0.1", 15672)
_FORWARDED = ("Authorization", "Content-Type", "Accept", "X-Reason")


class LosingProxy:
    """Forwards HTTP to the real management API; the answers to the first DELETEs (one per
    entry of ``faults``) are lost after the broker has carried them out: ``drop`` closes the
    connection without an answer, ``bad_gateway`` answers 502 (a load balancer that lost the
    broker's answer). ``too_many`` answers 429 without forwarding: the server refused it before
    doing anything."""

    def __init__(self, faults: list[str], port: int = 0) -> None:
        self.faults = faults
        self.deletes: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._forward()

            def do_PUT(self) -> None:
                self._forward()

            def do_DELETE(self) -> None:
                proxy.deletes.append(self.path)
                self._forward()

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy.faults.pop(0) if self.command == "DELETE" and proxy.faults else None
                if fault == "too_many":
                    self.send_response(429)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                upstream = http.client.HTTPConnection(*UPSTREAM, timeout=10)
                headers = {name: self.headers[name] for name in _FORWARDED if name in self.headers}
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                upstream.close()
                if fault == "drop":
                    self.close_connection = True
                    return
                self.send_response(502 if fault == "bad_gateway" else answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "0" if fault else str(len(data)))
                self.end_headers()
                if not fault:
                    self.wfile.write(data)

            def log_message(self, *_args: Any) -> None:
                return

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def broker() -> ManagementClient:
    """A client straight to the broker: to set up and to look."""
    return ManagementClient(f"http://{UPSTREAM[0]}:{UPSTREAM[1]}", "guest", "guest")


def through(proxy: LosingProxy) -> ManagementClient:
    return ManagementClient(proxy.url, "guest", "guest", timeout=5, backoff=0.05)


@pytest.fixture
def losing() -> Iterator[list[LosingProxy]]:
    proxies: list[LosingProxy] = []
    yield proxies
    for proxy in proxies:
        proxy.close()


@pytest.mark.parametrize("fault", ["drop", "bad_gateway"])
def test_a_delete_whose_answer_was_lost_counts_as_deleted(
    fault: str, vhost: str, broker: ManagementClient, losing: list[LosingProxy]
) -> None:
    # The topology's Delete reports what it removed ("Deleted" to CloudFormation), and a
    # permission change logs the connections it closed: a DELETE the broker carried out is one,
    # even when its answer was lost and the retry found nothing left.
    broker.put_queue(vhost, "work", durable=True, auto_delete=False, arguments={})
    broker.put_exchange(
        vhost,
        "events",
        exchange_type="topic",
        durable=True,
        auto_delete=False,
        internal=False,
        arguments={},
    )
    proxy = LosingProxy([fault, fault])
    losing.append(proxy)
    client = through(proxy)

    assert client.delete_queue(vhost, "work") is True
    assert client.delete_exchange(vhost, "events") is True

    assert len(proxy.deletes) == 4  # each tried twice
    assert broker.get_queue(vhost, "work") is None
    assert not [e for e in broker.list_exchanges(vhost) if e["name"] == "events"]


def test_a_delete_of_what_is_not_there_still_reports_false(
    vhost: str, losing: list[LosingProxy]
) -> None:
    proxy = LosingProxy([])
    losing.append(proxy)

    assert through(proxy).delete_queue(vhost, "never-declared") is False


def test_a_retry_after_a_refused_connection_that_finds_nothing_reports_false(
    vhost: str, losing: list[LosingProxy]
) -> None:
    # A refused connection never reached the broker: the retry's 404 means the queue was not
    # there, not that the first attempt deleted it.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = ManagementClient(f"http://127.0.0.1:{port}", "guest", "guest", timeout=5, backoff=1)

    def start_listening() -> None:
        time.sleep(0.3)  # after the first attempt was refused, before the retry
        losing.append(LosingProxy([], port=port))

    starter = threading.Thread(target=start_listening)
    starter.start()
    try:
        assert client.delete_queue(vhost, "never-declared") is False
    finally:
        starter.join()
    assert losing[0].deletes == [f"/api/queues/{vhost}/never-declared"]


def test_a_retry_after_too_many_requests_that_finds_nothing_reports_false(
    vhost: str, losing: list[LosingProxy]
) -> None:
    # A 429 (or 408) is the server saying "not now" before doing anything: the retry's 404
    # means the queue was not there, not that the first attempt deleted it.
    proxy = LosingProxy(["too_many"])
    losing.append(proxy)

    assert through(proxy).delete_queue(vhost, "never-declared") is False
    assert len(proxy.deletes) == 2
