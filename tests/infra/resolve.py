"""Follow references in synthesized templates: intrinsics to strings, cross-stack outputs to
the resource they name, and queue references to the queue they mean."""

from __future__ import annotations

from typing import Any

# What the pseudo parameters resolve to in the fabric's (commercial) partition.
PSEUDO = {"AWS::Partition": "aws", "AWS::URLSuffix": "amazonaws.com"}
# Lambda counts at most 4 KB of environment (keys and values) per function.
LAMBDA_ENVIRONMENT_LIMIT = 4096
# What an unresolved deploy-time value (an ARN, an id) is counted as when sizing: a long ARN.
UNKNOWN_VALUE_LENGTH = 100


class Unresolved(Exception):
    """The value depends on something only known at deploy time."""


def render(value: Any) -> str:
    """``value`` as the string CloudFormation makes of it.

    Raises:
        Unresolved: it refers to a resource or another stack's output.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and len(value) == 1:
        ((function, argument),) = value.items()
        if function == "Ref" and argument in PSEUDO:
            return PSEUDO[argument]
        if function == "Fn::Join":
            separator, parts = argument
            return str(separator).join(render(part) for part in parts)
    raise Unresolved(value)


def sized(value: Any) -> int:
    """How many bytes ``value`` takes at deploy time, unresolved references counted as long."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, dict) and len(value) == 1:
        ((function, argument),) = value.items()
        if function == "Ref" and argument in PSEUDO:
            return len(PSEUDO[argument])
        if function == "Fn::Join":
            separator, parts = argument
            return sum(sized(part) for part in parts) + len(separator) * max(len(parts) - 1, 0)
    return UNKNOWN_VALUE_LENGTH


def queue_key(
    reference: Any, *, services: dict[str, Any], stateful: dict[str, Any]
) -> tuple[str, str]:
    """The queue ``reference`` means, as ``("name", <queue name>)`` for a named queue, or
    ``("services", <logical id>)`` for an unnamed queue of the services stack.

    ``reference`` is a literal queue name, a ``GetAtt``/``Ref`` in the services template, or a
    ``Fn::GetStackOutput`` of the stateful stack.

    Raises:
        Unresolved: it is none of these.
    """
    if isinstance(reference, str):
        return ("name", reference)
    if isinstance(reference, dict) and "Fn::GetStackOutput" in reference:
        output = stateful["Outputs"][reference["Fn::GetStackOutput"]["OutputName"]]
        return _named(output["Value"], stateful, "stateful")
    return _named(reference, services, "services")


def _named(reference: Any, template: dict[str, Any], stack: str) -> tuple[str, str]:
    if isinstance(reference, dict) and "Fn::GetAtt" in reference:
        logical_id = reference["Fn::GetAtt"][0]
    elif isinstance(reference, dict) and "Ref" in reference:
        logical_id = reference["Ref"]
    else:
        raise Unresolved(reference)
    resource = template["Resources"][logical_id]
    if resource["Type"] != "AWS::SQS::Queue":
        raise Unresolved(reference)
    name = resource["Properties"].get("QueueName")
    if isinstance(name, str):
        return ("name", name)
    if stack != "services":
        raise Unresolved(reference)
    return ("services", logical_id)
