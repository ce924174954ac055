"""The answer CloudFormation gets from a custom resource: its size and its physical id."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fabric.custom_resource import MAX_RESPONSE_BYTES, respond
from fabric.errors import ConfigError

EVENT = {
    "ResponseURL": "https://cloudformation-response.example/presigned",
    "StackId": "arn:aws:cloudformation:ap-southeast-3:111111111111:stack/fabric-dev/1",
    "RequestId": "0f0e0d0c-0b0a-0908-0706-050403020100",
    "LogicalResourceId": "TopologyE1A2B3C4",
}


def answer(event: dict[str, Any], action: Any) -> tuple[dict[str, Any], bytes]:
    """The document ``respond`` returns and the body it sent."""
    sent: list[bytes] = []
    document = respond(event, "2025/01/01/[$LATEST]0123456789abcdef", action, send=_keep(sent))
    (body,) = sent
    return document, body


def _keep(sent: list[bytes]) -> Any:
    return lambda _url, body: sent.append(body)


@pytest.mark.parametrize("text", ["é" * 3000, "警报" * 2000, "🚨" * 2000, "x" * 9000])
def test_a_long_non_ascii_reason_still_fits_the_4096_bytes_cloudformation_accepts(
    text: str,
) -> None:
    def fails(_request: str, _props: Any) -> tuple[str, dict[str, str]]:
        raise ConfigError(text)

    document, body = answer({**EVENT, "RequestType": "Update", "PhysicalResourceId": "p"}, fails)

    assert len(body) <= MAX_RESPONSE_BYTES
    sent = json.loads(body)
    assert sent == document
    assert sent["Status"] == "FAILED"
    assert sent["Reason"].startswith(f"ConfigError: {text[:50]}")
    assert sent["Reason"].endswith("(log stream 2025/01/01/[$LATEST]0123456789abcdef)")
    assert sent["PhysicalResourceId"] == "p"


def test_a_delete_without_a_physical_id_is_answered_with_a_real_one() -> None:
    # CloudFormation always sends one with a Delete; should a request come without it, the
    # answer must still carry a non-empty id, never the text "None".
    document, body = answer({**EVENT, "RequestType": "Delete"}, lambda *_: ("", {}))

    assert document["Status"] == "SUCCESS"
    assert json.loads(body)["PhysicalResourceId"] == "TopologyE1A2B3C4"


def test_a_delete_answers_with_the_id_it_was_sent_whatever_the_action_returns() -> None:
    # CloudFormation wants the same physical id in every response for a resource.
    event = {**EVENT, "RequestType": "Delete", "PhysicalResourceId": "Topology-create-failed-r1"}

    document, _body = answer(event, lambda *_: ("fabric-dev-topology", {}))

    assert document["PhysicalResourceId"] == "Topology-create-failed-r1"
