"""The fabric's operational metric names: one list for the code that emits them and the alarms.

Published to CloudWatch namespace ``MessagingFabric`` with one dimension, ``Environment``.
Every router call publishes all four router counts (zeros too), so an alarm sees ``0`` rather
than missing data while traffic flows.
"""

from __future__ import annotations

NAMESPACE = "MessagingFabric"
DIMENSION = "Environment"

ACCEPTED_BY_BROKER = "AcceptedByBroker"
"""Messages RabbitMQ confirmed."""
ACCEPTED_BY_FALLBACK = "AcceptedByFallback"
"""Messages stored on the SNS/SQS fallback path: above zero means "fallback active"."""
REJECTED = "Rejected"
"""Messages refused, for any reason (bad input, permission, size, unavailable)."""
REJECTED_UNAVAILABLE = "RejectedUnavailable"
"""Messages neither path could store: the producer got an error (both paths down)."""
AUDIT_RECORDS_LOST = "AuditRecordsLost"
"""Audit records that no audit path could store (the router's, or those a consumer toolkit
dropped from its backlog): the trail is missing them. Written only when it happens."""
AUDIT_RECORDS_UNSENT = "AuditRecordsUnsent"
"""Consumer toolkit: audit records the audit path refused, kept to go out with the next batch
(lost if the process ends first). Written only when it happens."""
AUDIT_BATCHES_REFUSED = "AuditBatchesRefused"
"""EMF metric (``MessagingFabric``, dimension ``Environment``) of the audit writer function:
audit batches the writer stored as one ``refused-batch`` or ``unreadable-batch`` record instead
of their records (``Written.refused``), so the trail holds none of them. Written only when it
happens."""
DRAINED = "Drained"
"""Messages moved from the fallback queues back into RabbitMQ."""
DRAIN_MISDELIVERED = "DrainMisdelivered"
"""Copies the drain found in a group's fallback queue (or its subscription's DLQ) that were not
published for that group, and did not move (``DrainReport.misdelivered``): a subscription lost
or changed its filter, or a message reached the queue some other way. Written by every run."""
COMPLIANCE_REPORTS = "ComplianceReports"
"""Compliance reports written (one per run of the report function)."""
TRAIL_NOT_VERIFIED = "TrailNotVerified"
"""1 when a compliance report found the audit trail not verified, else 0."""
