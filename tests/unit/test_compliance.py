"""The compliance report's figures and its three renderings."""

from __future__ import annotations

import csv
import io
from html.parser import HTMLParser

from fabric.compliance import ObjectLock, build_report, render_csv, render_html

PERIOD = ("2026-12-03T00:00:00.000Z", "2026-12-04T00:00:00.000Z")


def record(event: str, at: str = "2026-12-03T10:00:00.000Z", **fields: object) -> dict:
    return {"event": event, "at": at, **fields}


def report(**overrides: object) -> dict:
    records = [
        record("accepted", transport="rabbitmq", classification="restricted", encrypted=True),
        record("accepted", transport="rabbitmq", classification="restricted", encrypted=False),
        record("accepted", transport="fallback", classification="public"),
        record("rejected", reason="unavailable"),
        record("rejected", reason="malformed_json"),
        record("redriven"),
        record("accepted", at="2026-12-02T23:59:59.999Z", transport="rabbitmq"),  # before
    ]
    arguments: dict = {
        "environment": "prod",
        "period": PERIOD,
        "records": records,
        "locks": [
            ObjectLock("a", "COMPLIANCE", "2033-12-03T00:00:00+00:00"),
            ObjectLock("b", None, None),
        ],
        "verified": True,
        "problem": None,
        "generated_at": "2026-12-04T00:05:00.000Z",
        **overrides,
    }
    return build_report(**arguments)


def test_the_figures_count_only_the_period() -> None:
    figures = report()
    assert figures["outcomes"] == {"accepted": 3, "redriven": 1, "rejected": 2}
    assert figures["accepted_by_transport"] == {"fallback": 1, "rabbitmq": 2}
    assert figures["fallback_activations"] == 1
    # 3 stored of the 4 valid messages offered (the malformed one is bad input, not a failure)
    assert figures["delivery_success_rate"] == 0.75
    assert figures["encryption"] == {"restricted_accepted": 2, "encrypted": 1, "coverage": 0.5}
    assert figures["object_lock"]["unlocked"] == ["b"], "an unlocked object is named"
    assert figures["object_lock"]["modes"] == {"COMPLIANCE": 1, "none": 1}


def test_the_page_is_self_contained_and_says_the_verdict() -> None:
    page = render_html(report(verified=False, problem="audit/x record 7: sequence gap"))
    tags: list[str] = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list) -> None:
            tags.append(tag)
            for _, value in attrs:
                assert "http" not in (value or ""), "no external resource"

    Collect().feed(page)
    assert "script" not in tags
    assert tags.count("svg") == 4
    assert "NOT VERIFIED: audit/x record 7: sequence gap" in page
    assert "50.00 %" in page


def test_the_csv_has_every_figure() -> None:
    rows = list(csv.reader(io.StringIO(render_csv(report()))))
    assert rows[0] == ["section", "name", "value"]
    assert ["outcomes", "accepted", "3"] in rows
    assert ["delivery", "success_rate", "0.75"] in rows
    assert ["verification", "verified", "True"] in rows
