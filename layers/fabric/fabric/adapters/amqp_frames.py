"""The frames of an AMQP 0-9-1 ``basic.publish``, encoded the way pika encodes them, only cheaper.

pika builds a method object, a properties object and a frame object per part of every publish,
and marshals each through generic encoders: about 9 µs a message by a micro-benchmark, a sixth
of the router's client CPU. ``PublishFrames`` writes the same bytes directly, about three times
faster, and encodes what repeats from message to message (the method frame of an exchange and
routing key, the header tables, the content type) once. The unit tests
hold its output to pika's own marshalling, byte for byte, for every property and body size it
handles, so the broker sees exactly what it saw before.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import pika.exceptions
from pika.spec import Basic, BasicProperties

from fabric.envelope import amqp_reply_to
from fabric.ports import OutboundMessage

_FRAME = struct.Struct(">BHI")  # type, channel, payload size
_CONTENT_HEADER = struct.Struct(">HxxQH")  # class, weight (0), body size, property flags
_LONG = struct.Struct(">I")
_TIMESTAMP = struct.Struct(">Q")
_FRAME_END = b"\xce"
_METHOD, _HEADER, _BODY = 1, 2, 3
_PERSISTENT = b"\x02"
_MANDATORY = b"\x01"
_ALWAYS = (
    BasicProperties.FLAG_CONTENT_TYPE
    | BasicProperties.FLAG_DELIVERY_MODE
    | BasicProperties.FLAG_MESSAGE_ID
    | BasicProperties.FLAG_TIMESTAMP
    | BasicProperties.FLAG_TYPE
)
_CACHE_LIMIT = 1024  # distinct method frames, and header tables, kept encoded


def short_string(value: str) -> bytes:
    """An AMQP short string: a length octet and at most 255 bytes of UTF-8.

    Raises:
        pika.exceptions.ShortStringTooLong: longer than 255 bytes (as pika raises it).
    """
    data = value.encode()
    if len(data) > 255:
        raise pika.exceptions.ShortStringTooLong(data)
    return bytes((len(data),)) + data


def string_table(headers: Mapping[str, str]) -> bytes:
    """An AMQP field table of string values (type ``S``), as pika's ``encode_table`` writes it.

    Raises:
        TypeError: a value is not a string (message headers are strings by contract).
    """
    entries = []
    for key, value in headers.items():
        if not isinstance(value, str):
            raise TypeError(f"header {key!r} is not a string")
        data = value.encode()
        entries.append(short_string(key) + b"S" + _LONG.pack(len(data)) + data)
    table = b"".join(entries)
    return _LONG.pack(len(table)) + table


class PublishFrames:
    """Encodes persistent, mandatory ``basic.publish`` messages for one channel.

    ``body_max`` is the largest body frame payload the connection negotiated (frame max minus
    the 8 bytes of frame header and end); longer bodies are split into several body frames.
    """

    def __init__(self, channel_number: int, body_max: int) -> None:
        self._channel = channel_number
        self._body_max = body_max
        self._methods: dict[tuple[str, str], bytes] = {}
        self._tables: dict[tuple[tuple[str, str], ...], bytes] = {}
        self._content_type = short_string("application/json")

    def encode(
        self,
        message: OutboundMessage,
        *,
        exchange: str,
        routing_key: str,
        timestamp: int,
        user_id: str | None = None,
    ) -> bytes:
        """Every frame of ``message`` as one buffer: method, content header, body frames.

        Properties: content type ``application/json``, persistent, the message's id, topic
        (as ``type``), headers (when there are any), correlation id and reply-to (when set;
        not a reply-to RabbitMQ reserves, see ``fabric.envelope.amqp_reply_to``), ``timestamp``
        (seconds) and ``user_id`` (when given).

        Raises:
            pika.exceptions.ShortStringTooLong: a name or property is longer than 255 bytes.
            TypeError: a header value is not a string.
        """
        flags = _ALWAYS
        properties = [self._content_type]
        if message.headers:
            flags |= BasicProperties.FLAG_HEADERS
            properties.append(self._table(message.headers))
        properties.append(_PERSISTENT)
        if message.correlation_id is not None:
            flags |= BasicProperties.FLAG_CORRELATION_ID
            properties.append(short_string(message.correlation_id))
        reply_to = amqp_reply_to(message.reply_to)
        if reply_to is not None:
            flags |= BasicProperties.FLAG_REPLY_TO
            properties.append(short_string(reply_to))
        properties.append(short_string(message.message_id))
        properties.append(_TIMESTAMP.pack(timestamp))
        properties.append(short_string(message.topic))
        if user_id is not None:
            flags |= BasicProperties.FLAG_USER_ID
            properties.append(short_string(user_id))
        encoded = b"".join(properties)
        body = message.body
        size = len(body)
        frames: list[bytes | memoryview] = [
            self._method(exchange, routing_key),
            _FRAME.pack(_HEADER, self._channel, _CONTENT_HEADER.size + len(encoded)),
            _CONTENT_HEADER.pack(BasicProperties.INDEX, size, flags),
            encoded,
            _FRAME_END,
        ]
        step = self._body_max
        if size <= step:
            if size:
                frames += (_FRAME.pack(_BODY, self._channel, size), body, _FRAME_END)
        else:  # a large body (an audit batch): split without copying it once more per frame
            whole = memoryview(body)
            for start in range(0, size, step):
                chunk = whole[start : start + step]
                frames += (_FRAME.pack(_BODY, self._channel, len(chunk)), chunk, _FRAME_END)
        return b"".join(frames)

    def _method(self, exchange: str, routing_key: str) -> bytes:
        key = (exchange, routing_key)
        frame = self._methods.get(key)
        if frame is None:
            if len(self._methods) >= _CACHE_LIMIT:
                self._methods.clear()
            payload = b"".join(
                (
                    _LONG.pack(Basic.Publish.INDEX),
                    b"\x00\x00",  # ticket
                    short_string(exchange),
                    short_string(routing_key),
                    _MANDATORY,
                )
            )
            frame = _FRAME.pack(_METHOD, self._channel, len(payload)) + payload + _FRAME_END
            self._methods[key] = frame
        return frame

    def _table(self, headers: Mapping[str, str]) -> bytes:
        # Messages of a route share their headers (the audience gate, mostly), so most tables
        # are encoded once.
        key = tuple(headers.items())
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) >= _CACHE_LIMIT:
                self._tables.clear()
            table = self._tables[key] = string_table(headers)
        return table
