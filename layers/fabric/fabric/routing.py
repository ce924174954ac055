"""The routing table: topic patterns with RabbitMQ semantics, header matches, publish rights."""

from __future__ import annotations

import functools
import itertools
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

from fabric.envelope import (
    MAX_TOPIC_BYTES,
    Classification,
    Envelope,
    Reason,
    Rejection,
    header_name_problem,
)
from fabric.errors import RoutingTableError
from fabric.stakeholders import Stakeholder

SCHEMA = "fabric.routing/1"
ROUTE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_PATTERN_WORD_RE = re.compile(r"[a-z0-9-]+|\*|#")
_GROUP_NAMES = frozenset(group.value for group in Stakeholder)


# --- topic patterns ---------------------------------------------------------------------------


def split_words(key: str) -> tuple[str, ...]:
    """Split a routing key or binding key into words exactly as RabbitMQ does.

    The empty string has no words at all (so `*` does not match it but `#` does); otherwise every
    dot separates two words, which may be empty (`"a..b"` is `a`, ``, `b`).
    """
    return tuple(key.split(".")) if key else ()


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str]:
    # Match against "." + key so every word, including the first, is preceded by a dot; then
    # `#` (zero or more words) is simply a repetition of "dot, word".
    parts: list[str] = []
    for word in split_words(pattern):
        if word == "#":
            if parts and parts[-1] == r"(?:\.[^.]*)*":
                continue  # `#.#` matches exactly what `#` matches; collapsing avoids backtracking
            parts.append(r"(?:\.[^.]*)*")
        elif word == "*":
            parts.append(r"\.[^.]*")
        else:
            parts.append(r"\." + re.escape(word))
    return re.compile("".join(parts), re.DOTALL)


def topic_matches(pattern: str, routing_key: str) -> bool:
    """Whether a RabbitMQ topic exchange would route `routing_key` to a binding `pattern`.

    `*` matches exactly one word, `#` zero or more words; any other word matches itself only.
    Proven equal to RabbitMQ by tests/integration/test_topic_semantics_rabbitmq.py.
    """
    dotted = "." + routing_key if routing_key else ""
    return _compiled(pattern).fullmatch(dotted) is not None


def pattern_problem(pattern: object) -> str | None:
    """Why `pattern` is not a valid routing-table pattern (None if it is valid).

    Valid patterns are non-empty, at most 255 bytes, and made of dot-separated words that are
    `[a-z0-9-]+` (the topic alphabet), `*` or `#`.
    """
    if not isinstance(pattern, str) or not pattern:
        return "pattern must be a non-empty string"
    if len(pattern.encode("utf-8")) > MAX_TOPIC_BYTES:
        return f"pattern exceeds {MAX_TOPIC_BYTES} bytes"
    for word in pattern.split("."):
        if not _PATTERN_WORD_RE.fullmatch(word):
            return f"pattern {pattern!r} has invalid word {word!r} (want [a-z0-9-]+, * or #)"
    return None


def patterns_intersect(first: str, second: str) -> bool:
    """Whether some valid topic is matched by both patterns (words are non-empty)."""
    a, b = split_words(first), split_words(second)

    @functools.cache
    def meet(i: int, j: int) -> bool:
        if i == len(a) and j == len(b):
            return True
        if i < len(a) and a[i] == "#" and (meet(i + 1, j) or (j < len(b) and meet(i, j + 1))):
            return True
        if j < len(b) and b[j] == "#" and (meet(i, j + 1) or (i < len(a) and meet(i + 1, j))):
            return True
        if i == len(a) or j == len(b) or "#" in (a[i], b[j]):
            return False
        return (a[i] == b[j] or "*" in (a[i], b[j])) and meet(i + 1, j + 1)

    return meet(0, 0)


def pattern_covers(general: str, specific: str) -> bool:
    """Whether every valid topic (one or more words) matched by `specific` is also matched by
    `general`.

    Decided by witnesses: instantiate `specific` with a word that is not a literal of `general`
    for each `*`, and 0..n+1 such words for each `#` (n = words in `general`). If `general`
    matches all witnesses it matches everything `specific` does: a longer run of fresh words can
    only be absorbed by a `#` of `general`, which absorbs any longer run too.
    """
    general_words = split_words(general)
    fresh = "fresh"
    while fresh in general_words:
        fresh += "-x"
    spec = split_words(specific)
    runs = [range(len(general_words) + 2) if word == "#" else range(1) for word in spec]
    for lengths in itertools.product(*runs):
        words: list[str] = []
        for word, length in zip(spec, lengths, strict=True):
            if word == "#":
                words.extend([fresh] * length)
            else:
                words.append(fresh if word == "*" else word)
        if not words:
            continue  # a topic has at least one word
        if not topic_matches(general, ".".join(words)):
            return False
    return True


# --- header matches ---------------------------------------------------------------------------


class HeaderMode(StrEnum):
    """How a route's header values combine, as RabbitMQ's headers exchange `x-match`."""

    ALL = "all"
    ANY = "any"


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """A header condition: all (or any) of `values` must equal the message's headers."""

    mode: HeaderMode
    values: tuple[tuple[str, str], ...]

    def matches(self, headers: Mapping[str, str]) -> bool:
        """Whether a message with these headers satisfies the condition."""
        hits = (headers.get(name) == value for name, value in self.values)
        return all(hits) if self.mode is HeaderMode.ALL else any(hits)

    def implies(self, other: HeaderMatch) -> bool:
        """Whether every header set satisfying this condition also satisfies `other`."""
        # Both modes are upward closed, so checking the minimal satisfying header sets suffices.
        if self.mode is HeaderMode.ALL:
            return other.matches(dict(self.values))
        return all(other.matches({name: value}) for name, value in self.values)

    def compatible(self, other: HeaderMatch) -> bool:
        """Whether some header set satisfies both this condition and `other`."""
        if self.mode is HeaderMode.ALL and other.mode is HeaderMode.ALL:
            mine = dict(self.values)
            return all(mine.get(name, value) == value for name, value in other.values)
        if self.mode is HeaderMode.ANY and other.mode is HeaderMode.ANY:
            return any(
                n1 != n2 or v1 == v2
                for (n1, v1), (n2, v2) in itertools.product(self.values, other.values)
            )
        every, some = (self, other) if self.mode is HeaderMode.ALL else (other, self)
        required = dict(every.values)
        return any(required.get(name, value) == value for name, value in some.values)


def _implies(first: HeaderMatch | None, second: HeaderMatch | None) -> bool:
    if second is None:
        return True
    return first is not None and first.implies(second)


def _compatible(first: HeaderMatch | None, second: HeaderMatch | None) -> bool:
    return first is None or second is None or first.compatible(second)


# --- the table --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    """One routing rule: messages whose topic matches `pattern` (and headers, if any) go to
    `groups`, on the emergency path when `emergency` is true."""

    name: str
    pattern: str
    groups: frozenset[Stakeholder]
    emergency: bool = False
    headers: HeaderMatch | None = None
    min_classification: Classification | None = None
    description: str = ""

    def matches(self, topic: str, headers: Mapping[str, str]) -> bool:
        """Whether a message with this topic and these headers takes this route."""
        return topic_matches(self.pattern, topic) and (
            self.headers is None or self.headers.matches(headers)
        )


@dataclass(frozen=True, slots=True)
class PublishRule:
    """Members of `source` may publish topics matching any of `patterns`."""

    source: Stakeholder
    patterns: tuple[str, ...]


class Delivery(NamedTuple):
    """Where one copy of a message goes: a group, on its emergency path or its normal one."""

    group: Stakeholder
    emergency: bool


_CACHE_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """A validated routing table; build it with `parse_routing_table` or `load_routing_table`."""

    version: int
    routes: tuple[Route, ...]
    publish: tuple[PublishRule, ...]
    # Per-topic answers, filled on first use: a router sees the same few topics again and again,
    # and matching every pattern of the table for every message is the router's hottest path.
    _by_topic: dict[str, tuple[tuple[Route, ...], bool]] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )  # topic -> (its routes, whether none of them looks at headers)
    _deliveries: dict[tuple[str, frozenset[Stakeholder] | None], frozenset[Delivery]] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )  # (topic, audience) -> deliveries, for topics whose routes never look at headers
    _publishers: dict[tuple[str, str], bool] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    def matching_routes(self, envelope: Envelope) -> tuple[Route, ...]:
        """The routes the envelope's topic and headers match, in table order."""
        by_topic, header_free = self._topic_routes(envelope.topic)
        if header_free:
            return by_topic
        return tuple(
            r for r in by_topic if r.headers is None or r.headers.matches(envelope.headers)
        )

    def _topic_routes(self, topic: str) -> tuple[tuple[Route, ...], bool]:
        known = self._by_topic.get(topic)
        if known is None:
            if len(self._by_topic) >= _CACHE_LIMIT:
                self._by_topic.clear()
            routes = tuple(r for r in self.routes if topic_matches(r.pattern, topic))
            known = self._by_topic[topic] = (routes, all(r.headers is None for r in routes))
        return known

    def deliveries(self, envelope: Envelope) -> frozenset[Delivery]:
        """Every (group, emergency) destination of the envelope, narrowed by its audience.

        Empty means unroutable: the message belongs in the unrouted queue.
        """
        key = (envelope.topic, envelope.audience)
        cached = self._deliveries.get(key)
        if cached is not None:
            return cached
        found = {
            Delivery(group, route.emergency)
            for route in self.matching_routes(envelope)
            for group in route.groups
        }
        if envelope.audience is not None:
            found = {d for d in found if d.group in envelope.audience}
        deliveries = frozenset(found)
        if self._topic_routes(envelope.topic)[1]:  # headers cannot change the answer
            if len(self._deliveries) >= _CACHE_LIMIT:
                self._deliveries.clear()
            self._deliveries[key] = deliveries
        return deliveries

    def resolve(self, envelope: Envelope) -> frozenset[Stakeholder]:
        """The groups that receive the envelope: the union of its matching routes' groups,
        narrowed to `audience` when the producer gave one (see `admit` for the subset rule)."""
        return frozenset(delivery.group for delivery in self.deliveries(envelope))

    def may_publish(self, source: str, topic: str) -> bool:
        """Whether `source` (a stakeholder group name) may publish `topic`; unknown sources
        may publish nothing."""
        key = (source, topic)
        allowed = self._publishers.get(key)
        if allowed is None:
            if len(self._publishers) >= _CACHE_LIMIT:
                self._publishers.clear()
            allowed = self._publishers[key] = self._may_publish(source, topic)
        return allowed

    def _may_publish(self, source: str, topic: str) -> bool:
        return any(
            rule.source.value == source and any(topic_matches(p, topic) for p in rule.patterns)
            for rule in self.publish
        )

    def admit(self, envelope: Envelope) -> Rejection | None:
        """Apply the table's rules to a validated envelope: None if admitted, else why not.

        Rejects `source_not_allowed` (no publish right for the topic), `audience_not_routable`
        (the audience names a group the table does not route this message to; audience only
        narrows, never extends) and `classification_too_low` (a matching route demands more).
        """
        if not self.may_publish(envelope.source, envelope.topic):
            return Rejection(
                Reason.SOURCE_NOT_ALLOWED,
                f"{envelope.source!r} may not publish {envelope.topic!r}",
                envelope.message_id,
            )
        routes = self.matching_routes(envelope)
        if envelope.audience is not None:
            routable = {group for route in routes for group in route.groups}
            extra = envelope.audience - routable
            if extra:
                return Rejection(
                    Reason.AUDIENCE_NOT_ROUTABLE,
                    f"{envelope.topic!r} is not routed to {', '.join(sorted(extra))}",
                    envelope.message_id,
                )
        for route in routes:
            floor = route.min_classification
            if floor is not None and envelope.classification.rank < floor.rank:
                return Rejection(
                    Reason.CLASSIFICATION_TOO_LOW,
                    f"route {route.name!r} requires classification {floor} or stricter",
                    envelope.message_id,
                )
        return None


# --- loading and validation -------------------------------------------------------------------

_TABLE_KEYS = frozenset({"schema", "version", "routes", "publish"})
_ROUTE_KEYS = frozenset(
    {
        "name",
        "description",
        "pattern",
        "groups",
        "emergency",
        "match_headers",
        "header_match",
        "min_classification",
    }
)
_PUBLISH_KEYS = frozenset({"source", "topics"})


def load_routing_table(path: Path | None = None) -> RoutingTable:
    """Load and validate a routing table TOML file (default: the one shipped in this package).

    Raises:
        RoutingTableError: the file is not valid TOML or breaks a validation rule.
        OSError: the file cannot be read.
    """
    if path is None:
        # Beside this module (the layer is a directory, never a zip): importlib.resources
        # would cost the router's cold start ~25 ms of imports for the same read.
        text = Path(__file__).with_name("routing_table.toml").read_text("utf-8")
    else:
        text = path.read_text("utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RoutingTableError(f"routing table is not valid TOML: {exc}") from exc
    return parse_routing_table(data)


@functools.cache
def default_routing_table() -> RoutingTable:
    """The packaged routing table, loaded once per process.

    Raises:
        RoutingTableError: the packaged table is invalid (caught by the unit tests first).
    """
    return load_routing_table()


def parse_routing_table(data: Mapping[str, Any]) -> RoutingTable:
    """Build a RoutingTable from decoded TOML and enforce every rule in docs/routing.md.

    Raises:
        RoutingTableError: naming the route (or publish rule) that breaks a rule.
    """
    _no_unknown_keys(data, _TABLE_KEYS, None)
    if data.get("schema") != SCHEMA:
        raise RoutingTableError(f"schema must be {SCHEMA!r}")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RoutingTableError("version must be a positive integer")
    raw_routes = data.get("routes")
    if not isinstance(raw_routes, list) or not raw_routes:
        raise RoutingTableError("the table needs at least one [[routes]] entry")
    routes = tuple(_parse_route(raw, index) for index, raw in enumerate(raw_routes))
    raw_publish = data.get("publish")
    if not isinstance(raw_publish, list) or not raw_publish:
        raise RoutingTableError("the table needs at least one [[publish]] entry")
    publish = tuple(_parse_publish(raw, index) for index, raw in enumerate(raw_publish))
    _check_names(routes)
    _check_publish_sources(publish)
    _check_unreachable(routes)
    _check_emergency_overlap(routes)
    _check_publishable(routes, publish)
    return RoutingTable(version=version, routes=routes, publish=publish)


def _no_unknown_keys(raw: Mapping[str, Any], allowed: frozenset[str], where: str | None) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise RoutingTableError(f"unknown key(s) {', '.join(unknown)}", route=where)


def _groups(raw: object, where: str) -> frozenset[Stakeholder]:
    if not isinstance(raw, list) or not raw:
        raise RoutingTableError("groups must be a non-empty list", route=where)
    for item in raw:
        if not isinstance(item, str) or item not in _GROUP_NAMES:
            known = ", ".join(sorted(_GROUP_NAMES))
            raise RoutingTableError(f"unknown group {item!r} (known: {known})", route=where)
    return frozenset(Stakeholder(item) for item in raw)


def _parse_route(raw: object, index: int) -> Route:
    if not isinstance(raw, dict):
        raise RoutingTableError(f"routes[{index}] must be a table")
    name = raw.get("name")
    if not isinstance(name, str) or not ROUTE_NAME_RE.fullmatch(name):
        raise RoutingTableError(
            f"routes[{index}] needs a name matching {ROUTE_NAME_RE.pattern}", route=None
        )
    _no_unknown_keys(raw, _ROUTE_KEYS, name)
    pattern = raw.get("pattern")
    problem = pattern_problem(pattern)
    if problem is not None or not isinstance(pattern, str):
        raise RoutingTableError(problem or "pattern must be a string", route=name)
    emergency = raw.get("emergency", False)
    if not isinstance(emergency, bool):
        raise RoutingTableError("emergency must be true or false", route=name)
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise RoutingTableError("description must be a string", route=name)
    floor = raw.get("min_classification")
    if floor is not None and (
        not isinstance(floor, str) or floor not in {c.value for c in Classification}
    ):
        raise RoutingTableError(f"unknown min_classification {floor!r}", route=name)
    return Route(
        name=name,
        pattern=pattern,
        groups=_groups(raw.get("groups"), name),
        emergency=emergency,
        headers=_parse_headers(raw, name),
        min_classification=None if floor is None else Classification(floor),
        description=description,
    )


def _parse_headers(raw: Mapping[str, Any], name: str) -> HeaderMatch | None:
    values = raw.get("match_headers")
    mode = raw.get("header_match")
    if values is None:
        if mode is not None:
            raise RoutingTableError("header_match without match_headers", route=name)
        return None
    if not isinstance(values, dict) or not values:
        raise RoutingTableError("match_headers must be a non-empty table", route=name)
    for header, value in values.items():
        problem = header_name_problem(header)
        if problem is not None:
            raise RoutingTableError(problem, route=name)
        if not isinstance(value, str):
            raise RoutingTableError(f"header {header!r} must match a string", route=name)
    if mode not in (None, "all", "any"):
        raise RoutingTableError("header_match must be 'all' or 'any'", route=name)
    return HeaderMatch(HeaderMode(mode or "all"), tuple(sorted(values.items())))


def _parse_publish(raw: object, index: int) -> PublishRule:
    where = f"publish[{index}]"
    if not isinstance(raw, dict):
        raise RoutingTableError("must be a table", route=where)
    _no_unknown_keys(raw, _PUBLISH_KEYS, where)
    source = raw.get("source")
    if not isinstance(source, str) or source not in _GROUP_NAMES:
        raise RoutingTableError(f"unknown source group {source!r}", route=where)
    topics = raw.get("topics")
    if not isinstance(topics, list) or not topics:
        raise RoutingTableError("topics must be a non-empty list of patterns", route=where)
    for pattern in topics:
        problem = pattern_problem(pattern)
        if problem is not None:
            raise RoutingTableError(problem, route=where)
    return PublishRule(Stakeholder(source), tuple(topics))


def _check_names(routes: Iterable[Route]) -> None:
    seen: set[str] = set()
    for route in routes:
        if route.name in seen:
            raise RoutingTableError("duplicate route name", route=route.name)
        seen.add(route.name)


def _check_publish_sources(rules: Iterable[PublishRule]) -> None:
    seen: set[Stakeholder] = set()
    for index, rule in enumerate(rules):
        if rule.source in seen:
            raise RoutingTableError(
                f"second publish rule for {rule.source}; merge them", route=f"publish[{index}]"
            )
        seen.add(rule.source)


def covers(general: Route, specific: Route) -> bool:
    """Whether `general` makes `specific` redundant: it matches every message `specific`
    matches (pattern containment and header implication), on the same path, for at least the
    same groups, demanding at least the same classification."""
    floor_specific = specific.min_classification.rank if specific.min_classification else -1
    floor_general = general.min_classification.rank if general.min_classification else -1
    return (
        general.emergency == specific.emergency
        and general.groups >= specific.groups
        and floor_general >= floor_specific
        and pattern_covers(general.pattern, specific.pattern)
        and _implies(specific.headers, general.headers)
    )


def _check_unreachable(routes: tuple[Route, ...]) -> None:
    for index, route in enumerate(routes):
        for other_index, other in enumerate(routes):
            if other_index == index or not covers(other, route):
                continue
            # Two routes that cover each other are duplicates: report the later one only.
            if other_index > index and covers(route, other):
                continue
            raise RoutingTableError(
                f"unreachable: route {other.name!r} already delivers every message it matches "
                "to the same groups on the same path",
                route=route.name,
            )


def overlaps(first: Route, second: Route) -> bool:
    """Whether some message (topic and headers) is matched by both routes."""
    return patterns_intersect(first.pattern, second.pattern) and _compatible(
        first.headers, second.headers
    )


def _check_emergency_overlap(routes: tuple[Route, ...]) -> None:
    """A message is an emergency or not, for every group it reaches: on RabbitMQ one message
    could go down both paths, but the fallback path (one SNS topic per message) and the drain
    carry it down one only, so an overlap is refused whatever the groups."""
    for first, second in itertools.combinations(routes, 2):
        if first.emergency != second.emergency and overlaps(first, second):
            emergency, normal = (first, second) if first.emergency else (second, first)
            shared = first.groups & second.groups
            what = (
                f"the emergency and the normal queue of {', '.join(sorted(shared))}"
                if shared
                else "emergency queues of some groups and normal queues of others, which the "
                "fallback path cannot carry apart"
            )
            raise RoutingTableError(
                f"emergency route overlaps non-emergency route {normal.name!r}: one message "
                f"would reach {what}",
                route=emergency.name,
            )


def _check_publishable(routes: Iterable[Route], rules: tuple[PublishRule, ...]) -> None:
    for route in routes:
        if not any(
            patterns_intersect(route.pattern, pattern)
            for rule in rules
            for pattern in rule.patterns
        ):
            raise RoutingTableError(
                "no source is permitted to publish any topic it matches", route=route.name
            )
