"""The stakeholder groups that exchange messages through the fabric."""

from __future__ import annotations

from enum import StrEnum


class Stakeholder(StrEnum):
    """A stakeholder group; its value names queues, users and SNS filter values."""

    GOVERNMENT = "government"
    BUSINESS = "business"
    ACADEMIC = "academic"
    COMMUNITY = "community"
    MEDIA = "media"


STAKEHOLDERS: tuple[Stakeholder, ...] = tuple(Stakeholder)
