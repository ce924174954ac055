"""Where the audit writer keeps things: objects in the Object Lock bucket (S3), chain states and
written batch ids in the idempotency table (DynamoDB)."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from fabric.audit_writer import ChainState
from fabric.errors import TransportUnavailable

# A redelivered audit batch arrives within the queue's retention (14 days at most).
BATCH_MARK_TTL_SECONDS = 14 * 24 * 3600


class _Body:
    """A GetObject body whose read raises ``TransportUnavailable`` for S3 trouble."""

    def __init__(self, key: str, stream: Any) -> None:
        self._key = key
        self._stream = stream

    def read(self, *size: int) -> bytes:
        from botocore.exceptions import BotoCoreError

        try:
            return bytes(self._stream.read(*size))
        except BotoCoreError as exc:
            raise TransportUnavailable(f"cannot read {self._key}: {type(exc).__name__}") from exc

    def close(self) -> None:
        self._stream.close()


class S3ObjectStore:
    """Objects in the audit bucket; its default Object Lock retention applies to each version.

    The writer puts, or creates (a key only while the bucket holds no object there); the
    verifier, the compliance report and replay list and read (their roles hold only the read
    grants), and the report also lists delete markers (``deleted``). Every S3 error becomes
    ``TransportUnavailable`` (also one while a body streams), except a key that does not
    exist, which ``read`` and ``response`` give as None, and a key ``create`` finds taken at
    its first attempt.
    """

    def __init__(self, bucket: str, client_factory: Callable[[], Any]) -> None:
        self._bucket = bucket
        self._client_factory = client_factory
        self._client: Any = None

    def _s3(self) -> Any:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def put(self, key: str, data: bytes) -> None:
        """Store one object, with a SHA-256 checksum S3 checks on arrival (a new version if
        the key exists).

        Raises:
            TransportUnavailable: S3 cannot be reached or refuses the object.
        """
        self._put(key, data)

    def create(self, key: str, data: bytes) -> bool:
        """Store one object as ``put`` does, but only if the key holds none: a conditional
        write (``If-None-Match: *``). False when the key holds another object (S3 answers 412
        Precondition Failed; nothing is stored). A 412 that answers the client's own retry (a
        lost answer, a 503) is true when the key holds this very object, which the first
        attempt stored (``_holds``), false when it holds another.

        Raises:
            TransportUnavailable: S3 cannot be reached or refuses the object (also 409
                ConditionalRequestConflict: another write of the key was under way; retry).
        """
        return self._put(key, data, IfNoneMatch="*")

    def _put(self, key: str, data: bytes, **condition: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._s3().put_object(
                Bucket=self._bucket,
                Key=key,
                Body=data,
                ContentType="application/json",
                ChecksumAlgorithm="SHA256",
                **condition,
            )
        except ClientError as exc:
            if condition and _code(exc) == "PreconditionFailed":
                # botocore sent the request again (a connection reset, a read timeout, a 503):
                # the earlier attempt may have stored this very object before its answer was
                # lost, or never reached S3. The object the key holds tells which.
                return _retried(exc) and self._holds(key, data)
            raise TransportUnavailable(f"cannot store {key}: {type(exc).__name__}") from exc
        except BotoCoreError as exc:
            raise TransportUnavailable(f"cannot store {key}: {type(exc).__name__}") from exc
        return True

    def _holds(self, key: str, data: bytes) -> bool:
        """Whether the newest version of ``key`` is ``data``: its SHA-256, the checksum S3
        checked on its arrival (``HeadObject``, which needs ``s3:GetObject``).

        Raises:
            TransportUnavailable: S3 cannot be reached or refuses the call.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            head = self._s3().head_object(Bucket=self._bucket, Key=key, ChecksumMode="ENABLED")
        except (BotoCoreError, ClientError) as exc:
            raise TransportUnavailable(f"cannot read {key}: {type(exc).__name__}") from exc
        return bool(head.get("ChecksumSHA256") == _sha256_checksum(data))

    def get(self, key: str) -> bytes:
        """The newest version of ``key``.

        Raises:
            TransportUnavailable: there is no such key, or S3 refuses the read.
        """
        data = self.read(key)
        if data is None:
            raise TransportUnavailable(f"cannot read {key}: no such key")
        return data

    def read(self, key: str) -> bytes | None:
        """The newest version of ``key``; None when there is no such key.

        Raises:
            TransportUnavailable: S3 cannot be reached or refuses the read.
        """
        response = self.response(key)
        return None if response is None else bytes(response["Body"].read())

    def response(self, key: str) -> dict[str, Any] | None:
        """S3's GetObject response for ``key`` (body unread, Object Lock headers included when
        the caller may read retention); None when there is no such key.

        Raises:
            TransportUnavailable: S3 cannot be reached or refuses the read.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = dict(self._s3().get_object(Bucket=self._bucket, Key=key))
        except ClientError as exc:
            code = _code(exc)
            # S3 answers a missing key with 404 only to a caller it lets list the bucket, and
            # the readers may list only their prefixes (a condition GetObject does not carry):
            # to them it is 403. A listing of the key itself tells the two apart.
            if code in ("NoSuchKey", "404") or (code == "AccessDenied" and not self._exists(key)):
                return None
            raise TransportUnavailable(f"cannot read {key}: {type(exc).__name__}") from exc
        except BotoCoreError as exc:
            raise TransportUnavailable(f"cannot read {key}: {type(exc).__name__}") from exc
        # The body streams after the headers: a connection that drops meanwhile is an outage
        # too (its botocore error would escape the callers, which catch TransportUnavailable).
        if "Body" in response:
            response["Body"] = _Body(key, response["Body"])
        return response

    def _exists(self, key: str) -> bool:
        """Whether ``key`` is listed (True also when the listing fails: then the read's refusal
        stands).
        """
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            listed = self._s3().list_objects_v2(Bucket=self._bucket, Prefix=key, MaxKeys=1)
        except (BotoCoreError, ClientError):
            return True
        return any(item.get("Key") == key for item in listed.get("Contents", []))

    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, in key order.

        Raises:
            TransportUnavailable: the bucket cannot be listed.
        """
        pages = self._pages("list_objects_v2", Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def deleted(self, prefix: str, *, after: str = "") -> list[str]:
        """The keys under ``prefix`` (after the key ``after``, if given) with a delete marker
        among their versions, in key order: ListObjectVersions, which needs
        ``s3:ListBucketVersions``.

        Raises:
            TransportUnavailable: the versions cannot be listed.
        """
        start = {"KeyMarker": after} if after else {}
        pages = self._pages("list_object_versions", Prefix=prefix, **start)
        # S3 starts after KeyMarker; compared here too, for an emulator that starts at it.
        return sorted(
            {
                str(marker["Key"])
                for page in pages
                for marker in page.get("DeleteMarkers", [])
                if marker["Key"] > after
            }
        )

    def _pages(self, operation: str, **arguments: str) -> list[dict[str, Any]]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            paginator = self._s3().get_paginator(operation)
            return list(paginator.paginate(Bucket=self._bucket, **arguments))
        except (BotoCoreError, ClientError) as exc:
            raise TransportUnavailable(
                f"cannot list {arguments.get('Prefix')}: {type(exc).__name__}"
            ) from exc


def _code(exc: Any) -> str | None:
    """A botocore ``ClientError``'s error code."""
    code = exc.response.get("Error", {}).get("Code")
    return None if code is None else str(code)


def _sha256_checksum(data: bytes) -> str:
    """S3's form of a SHA-256 checksum: the digest in base64."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def _retried(exc: Any) -> bool:
    """Whether botocore sent the request of a ``ClientError`` more than once (its own retries:
    the S3 client's standard mode), which it says in the response's ``RetryAttempts``."""
    return bool(exc.response.get("ResponseMetadata", {}).get("RetryAttempts"))


def _cancellation(exc: Any) -> str:
    """The error code, with a cancelled transaction's reasons (one per action, in order)."""
    code = str(exc.response.get("Error", {}).get("Code"))
    reasons = [str(r.get("Code")) for r in exc.response.get("CancellationReasons") or ()]
    return f"{code} ({', '.join(reasons)})" if reasons else code


def _lost_the_race(exc: Any) -> bool:
    """Whether a failed save means another writer advanced the chain: the chain item's version
    check failed, or another transaction held it. A transaction cancelled because it was
    throttled, or for a refused item, is the table's trouble, not a conflict: the writer must
    not report a second writer that does not exist."""
    if exc.response.get("Error", {}).get("Code") != "TransactionCanceledException":
        return False
    reasons = exc.response.get("CancellationReasons")
    if not reasons:  # reasons not given: the version check is the only condition in it
        return True
    codes = [str(reason.get("Code")) for reason in reasons]
    # The chain item comes first and holds the only condition; a concurrent transaction on any
    # item (the same batch's mark, written by another attempt) is a race as well.
    return codes[0] == "ConditionalCheckFailed" or "TransactionConflict" in codes


class DynamoDbChainStore:
    """Chain states as items ``audit-chain#<writer>`` (no expiry) and written batch ids as
    ``audit-batch#<id>`` (expiring after 14 days), updated together in one transaction."""

    def __init__(self, table: str, client_factory: Callable[[], Any]) -> None:
        self._table = table
        self._client_factory = client_factory
        self._client: Any = None

    def _dynamodb(self) -> Any:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def load(self, writer: str) -> ChainState:
        """The stored state, or a new chain."""
        item = self._call(
            "get_item",
            TableName=self._table,
            Key={"id": {"S": f"audit-chain#{writer}"}},
            ConsistentRead=True,
        ).get("Item")
        if item is None:
            return ChainState()
        state = json.loads(item["state"]["S"])
        return ChainState(
            seq=state["seq"],
            last_hash=state["last_hash"],
            pending=[(key, digest) for key, digest in state["pending"]],
            checkpoints=state["checkpoints"],
            last_signature=state["last_signature"],
            version=int(item["version"]["N"]),
            intent=(state["intent"][0], state["intent"][1]) if state.get("intent") else None,
            abandoned=[(key, digest) for key, digest in state.get("abandoned", [])],
            named=[(key, digest) for key, digest in state.get("named", [])],
            sealing=state.get("sealing"),
        )

    def save(self, writer: str, state: ChainState, *, batch_ids: Sequence[str]) -> bool:
        """One transaction: the state if its version is unchanged, and the batch marks."""
        from botocore.exceptions import BotoCoreError, ClientError

        document = {
            "seq": state.seq,
            "last_hash": state.last_hash,
            "pending": state.pending,
            "checkpoints": state.checkpoints,
            "last_signature": state.last_signature,
            "intent": state.intent,
            "abandoned": state.abandoned,
            "named": state.named,
            "sealing": state.sealing,
        }
        condition: dict[str, Any] = (
            {"ConditionExpression": "attribute_not_exists(id)"}
            if state.version == 0
            else {
                "ConditionExpression": "version = :expected",
                "ExpressionAttributeValues": {":expected": {"N": str(state.version)}},
            }
        )
        expiration = str(int(time.time()) + BATCH_MARK_TTL_SECONDS)
        items: list[dict[str, Any]] = [
            {
                "Put": {
                    "TableName": self._table,
                    "Item": {
                        "id": {"S": f"audit-chain#{writer}"},
                        "state": {"S": json.dumps(document, separators=(",", ":"))},
                        "version": {"N": str(state.version + 1)},
                    },
                    **condition,
                }
            },
            *(
                {
                    "Put": {
                        "TableName": self._table,
                        "Item": {
                            "id": {"S": f"audit-batch#{batch_id}"},
                            "expiration": {"N": expiration},
                        },
                    }
                }
                for batch_id in dict.fromkeys(batch_ids)
            ),
        ]
        try:
            self._dynamodb().transact_write_items(TransactItems=items)
        except ClientError as exc:
            if _lost_the_race(exc):
                return False
            raise TransportUnavailable(
                f"cannot save the chain of {writer}: {_cancellation(exc)}"
            ) from exc
        except BotoCoreError as exc:
            raise TransportUnavailable(
                f"cannot save the chain of {writer}: {type(exc).__name__}"
            ) from exc
        state.version += 1
        return True

    def written(self, batch_ids: Sequence[str]) -> set[str]:
        """Which ``batch_ids`` carry a mark."""
        found: set[str] = set()
        unique = list(dict.fromkeys(batch_ids))
        for start in range(0, len(unique), 100):
            keys = [{"id": {"S": f"audit-batch#{b}"}} for b in unique[start : start + 100]]
            response = self._call(
                "batch_get_item",
                RequestItems={self._table: {"Keys": keys, "ConsistentRead": True}},
            )
            found.update(
                item["id"]["S"].removeprefix("audit-batch#")
                for item in response["Responses"].get(self._table, [])
            )
            if response.get("UnprocessedKeys"):
                raise TransportUnavailable("the batch marks could not all be read")
        return found

    def _call(self, operation: str, **arguments: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._dynamodb(), operation)(**arguments)
        except (BotoCoreError, ClientError) as exc:
            raise TransportUnavailable(f"the chain store: {type(exc).__name__}") from exc
