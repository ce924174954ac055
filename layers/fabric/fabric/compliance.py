"""The compliance report: what the audit trail says about a period, for machines and people.

``build_report`` turns verified records (and what S3 says about each object's lock) into one
JSON document; ``render_html`` makes a self-contained page (inline SVG charts, no external
resources, no script); ``render_csv`` the same figures as rows.
"""

from __future__ import annotations

import csv
import html
import io
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

REPORT_VERSION = "fabric.compliance-report/1"


@dataclass(frozen=True)
class ObjectLock:
    """What S3 says about one audit object's lock."""

    key: str
    mode: str | None
    retain_until: str | None


def build_report(
    *,
    environment: str,
    period: tuple[str, str],
    records: Iterable[Mapping[str, Any]],
    locks: Sequence[ObjectLock],
    verified: bool,
    problem: str | None,
    generated_at: str,
) -> dict[str, Any]:
    """The report's figures for ``period`` (ISO timestamps, start inclusive, end exclusive)."""
    start, end = period
    events: Counter[str] = Counter()
    transports: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    restricted = encrypted = 0
    for record in records:
        at = str(record.get("at", ""))
        if not start <= at < end:
            continue
        event = str(record.get("event"))
        events[event] += 1
        if event == "accepted":
            transports[str(record.get("transport"))] += 1
            if record.get("classification") == "restricted":
                restricted += 1
                encrypted += bool(record.get("encrypted"))
        elif event == "rejected":
            reasons[str(record.get("reason"))] += 1
    unavailable = reasons.get("unavailable", 0)
    offered = events["accepted"] + unavailable
    modes = Counter(lock.mode or "none" for lock in locks)
    return {
        "version": REPORT_VERSION,
        "environment": environment,
        "period": {"start": start, "end": end},
        "generated_at": generated_at,
        "outcomes": dict(sorted(events.items())),
        "accepted_by_transport": dict(sorted(transports.items())),
        "rejected_by_reason": dict(sorted(reasons.items())),
        # Valid messages the fabric could store, of those it was offered (bad input excluded).
        "delivery_success_rate": None if offered == 0 else events["accepted"] / offered,
        "fallback_activations": transports.get("fallback", 0),
        "dead_letters": {
            "dead_lettered": events.get("dead-lettered", 0),
            "redriven": events.get("redriven", 0),
            "drained": events.get("drained", 0),
        },
        "encryption": {
            "restricted_accepted": restricted,
            "encrypted": encrypted,
            "coverage": None if restricted == 0 else encrypted / restricted,
        },
        # Needs delivery records from consumers, which the trail does not hold yet.
        "emergency_latency_ms": {"p50": None, "p95": None, "p99": None, "source": "not recorded"},
        "object_lock": {
            "objects": len(locks),
            "modes": dict(sorted(modes.items())),
            "earliest_retain_until": min(
                (lock.retain_until for lock in locks if lock.retain_until), default=None
            ),
            "unlocked": [lock.key for lock in locks if lock.mode is None],
        },
        "verification": {"verified": verified, "problem": problem},
    }


def render_csv(report: Mapping[str, Any]) -> str:
    """Every figure as a ``section,name,value`` row."""
    out = io.StringIO()
    rows = csv.writer(out)
    rows.writerow(["section", "name", "value"])
    for section in (
        "outcomes",
        "accepted_by_transport",
        "rejected_by_reason",
        "dead_letters",
        "encryption",
    ):
        for name, value in report[section].items():
            rows.writerow([section, name, value])
    rows.writerow(["delivery", "success_rate", report["delivery_success_rate"]])
    rows.writerow(["delivery", "fallback_activations", report["fallback_activations"]])
    for name, value in report["object_lock"]["modes"].items():
        rows.writerow(["object_lock", name, value])
    rows.writerow(["verification", "verified", report["verification"]["verified"]])
    return out.getvalue()


def _bars(title: str, values: Mapping[str, int]) -> str:
    """A horizontal bar chart as inline SVG (sized in the page's own units, no fonts loaded)."""
    if not values:
        return f"<figure><figcaption>{html.escape(title)}</figcaption><p>none</p></figure>"
    top = max(values.values()) or 1
    row, label_w, bar_w = 26, 170, 380
    parts = []
    for i, (name, value) in enumerate(values.items()):
        y = i * row
        width = max(1, round(bar_w * value / top))
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 17}" text-anchor="end">{html.escape(name)}</text>'
            f'<rect x="{label_w}" y="{y + 4}" width="{width}" height="18" rx="3"></rect>'
            f'<text x="{label_w + width + 6}" y="{y + 17}">{value}</text>'
        )
    height = row * len(values)
    return (
        f"<figure><figcaption>{html.escape(title)}</figcaption>"
        f'<svg role="img" aria-label="{html.escape(title)}" viewBox="0 0 640 {height}" '
        f'width="640" height="{height}">{"".join(parts)}</svg></figure>'
    )


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.2f} %"


def render_html(report: Mapping[str, Any]) -> str:
    """A self-contained page: no script, no external stylesheet, font or image."""
    verification = report["verification"]
    verdict = (
        '<p class="ok">The trail verifies: signatures, hash chains, Merkle roots, sequence.</p>'
        if verification["verified"]
        else f'<p class="bad">NOT VERIFIED: {html.escape(str(verification["problem"]))}</p>'
    )
    lock = report["object_lock"]
    summary = [
        ("Delivery success rate", _percent(report["delivery_success_rate"])),
        ("Fallback activations (messages)", str(report["fallback_activations"])),
        ("Encryption coverage of restricted", _percent(report["encryption"]["coverage"])),
        ("Emergency latency p50 / p95 / p99", "not recorded yet"),
        (
            "Audit objects / Object Lock modes",
            f"{lock['objects']} / "
            + ", ".join(f"{mode} {count}" for mode, count in lock["modes"].items()),
        ),
        ("Earliest retain-until", str(lock["earliest_retain_until"])),
    ]
    table = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary
    )
    period = report["period"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Messaging Fabric compliance report {html.escape(report["environment"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #1b1b1b; max-width: 60rem; }}
h1 {{ font-size: 1.5rem; }} th {{ text-align: left; padding-right: 2rem; font-weight: 600; }}
td, th {{ padding: .25rem 0; border-bottom: 1px solid #ddd; }}
figure {{ margin: 1.5rem 0; }} figcaption {{ font-weight: 600; margin-bottom: .5rem; }}
svg text {{ font-size: 13px; fill: #1b1b1b; }} svg rect {{ fill: #2f6db5; }}
.ok {{ color: #116b2f; font-weight: 600; }} .bad {{ color: #a4161a; font-weight: 700; }}
</style></head><body>
<h1>Messaging Fabric: compliance report, {html.escape(report["environment"])}</h1>
<p>Period {html.escape(period["start"])} to {html.escape(period["end"])};
generated {html.escape(report["generated_at"])}.</p>
{verdict}
<table>{table}</table>
{_bars("Outcomes (audit records per event)", report["outcomes"])}
{_bars("Accepted messages per transport", report["accepted_by_transport"])}
{_bars("Rejections per reason", report["rejected_by_reason"])}
{_bars("Dead letters", report["dead_letters"])}
</body></html>
"""
