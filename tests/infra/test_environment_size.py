"""Every function's environment stays well inside Lambda's 4 KB, counted as Lambda counts it
(the bytes of every key and value), each deploy-time value at the longest it can be."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest
from aws_cdk import App, Stack

from fabric.naming import drain_function_name
from stacks.constructs.drain import Drain
from tests.infra.conftest import Assembly, Synthesized
from tests.infra.resolve import LAMBDA_ENVIRONMENT_LIMIT, PSEUDO

# What a function may use of the 4 KB: the rest is room for a group, a variable or a longer
# region, account or name before a deploy fails on the limit.
BUDGET = 3 * 1024

# The longest a name can be where CloudFormation chooses it: SQS queue names are at most 80
# characters, S3 bucket names 63, DynamoDB table names 255 and SNS topic names 256. It names a
# secret ``<logical id>-<12 characters>``, to which Secrets Manager's ARN adds ``-<6>``.
_QUEUE, _BUCKET, _TABLE, _TOPIC = 80, 63, 255, 256
_GENERATED_SECRET_SUFFIX = len("-abcdefghijkl")
_SECRET_ARN_SUFFIX = len("-AbCdEf")
_KEY_ID = len("1234abcd-12ab-34cd-56ef-1234567890ab")  # also a multi-Region key's mrk-<32 hex>
_BROKER_ID = len("b-1234abcd-12ab-34cd-56ef-1234567890ab")


def _templates(env: Synthesized, assembly: Assembly) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stage's stateful and services templates."""
    directory = assembly.outdir / env.stage.artifact_id
    stateful, services = (
        json.loads((directory / stack.template_file).read_text())
        for stack in (env.stage.stateful, env.stage.services)
    )
    return stateful, services


class DeployedLength:
    """How many bytes a template value takes at deploy time, at most."""

    def __init__(self, env: Synthesized, stateful: dict[str, Any]) -> None:
        self._region = env.region
        self._account = env.stage.stateful.account
        self._pseudo = {**PSEUDO, "AWS::Region": self._region, "AWS::AccountId": self._account}
        self._stateful = stateful

    def of(self, value: Any, template: dict[str, Any]) -> int:
        """``value`` of ``template``: literal text, pseudo parameters, joins, outputs of the
        stateful stack, and references to the resources the functions are given."""
        if isinstance(value, str):
            return len(value.encode())
        ((function, argument),) = value.items()
        if function == "Fn::Join":
            separator, parts = argument
            joined = sum(self.of(part, template) for part in parts)
            return joined + len(separator.encode()) * max(len(parts) - 1, 0)
        if function == "Fn::GetStackOutput":
            output = self._stateful["Outputs"][argument["OutputName"]]["Value"]
            return self.of(output, self._stateful)
        if function == "Ref" and argument in self._pseudo:
            return len(self._pseudo[argument])
        if function in {"Ref", "Fn::GetAtt"}:
            logical_id, attribute = (argument, "Ref") if function == "Ref" else argument
            return self._longest(logical_id, template["Resources"][logical_id], attribute)
        raise AssertionError(f"no bound for {value}: add one")

    def _longest(self, logical_id: str, resource: dict[str, Any], attribute: str) -> int:
        """The longest ``attribute`` of ``resource`` can be: its literal name where it has one,
        else the longest name CloudFormation may give it, in its URL or ARN."""
        kind, props = resource["Type"], resource["Properties"]
        arn = f"arn:aws:{kind.split('::')[1].lower()}:{self._region}:{self._account}:"
        url = f"https://sqs.{self._region}.amazonaws.com/{self._account}/"
        generated_secret = len(logical_id) + _GENERATED_SECRET_SUFFIX
        # (before the name, the name's property, its longest generated length, after the name)
        bounds = {
            ("AWS::SQS::Queue", "Ref"): (url, "QueueName", _QUEUE, 0),
            ("AWS::SQS::Queue", "Arn"): (arn, "QueueName", _QUEUE, 0),
            ("AWS::SecretsManager::Secret", "Ref"): (
                f"{arn}secret:",
                "Name",
                generated_secret,
                _SECRET_ARN_SUFFIX,
            ),
            ("AWS::KMS::Key", "Arn"): (f"{arn}key/", None, _KEY_ID, 0),
            ("AWS::AmazonMQ::Broker", "Ref"): ("", None, _BROKER_ID, 0),
            ("AWS::S3::Bucket", "Ref"): ("", "BucketName", _BUCKET, 0),
            ("AWS::DynamoDB::Table", "Ref"): ("", "TableName", _TABLE, 0),
            ("AWS::SNS::Topic", "Ref"): (arn, "TopicName", _TOPIC, 0),
        }
        if (kind, attribute) not in bounds:
            raise AssertionError(f"no bound for {attribute} of {kind}: add one")
        before, key, longest, after = bounds[(kind, attribute)]
        name = props.get(key) if key else None
        return len(before) + (len(name) if isinstance(name, str) else longest) + after


def environment_sizes(env: Synthesized, assembly: Assembly) -> dict[str, int]:
    """Every function of the stage (function name, or logical id) → its environment's bytes."""
    stateful, services = _templates(env, assembly)
    length = DeployedLength(env, stateful)
    sizes = {}
    for template in (stateful, services):
        for logical_id, resource in template["Resources"].items():
            if resource["Type"] != "AWS::Lambda::Function":
                continue
            props = resource["Properties"]
            variables = props.get("Environment", {}).get("Variables", {})
            name = props.get("FunctionName", logical_id)
            sizes[name] = sum(
                len(key.encode()) + length.of(value, template) for key, value in variables.items()
            )
    return sizes


def test_every_functions_environment_stays_inside_its_budget(
    env: Synthesized, assembly: Assembly
) -> None:
    sizes = environment_sizes(env, assembly)
    assert BUDGET < LAMBDA_ENVIRONMENT_LIMIT
    assert {name: size for name, size in sizes.items() if size > BUDGET} == {}
    # The drain once held twenty queue URLs with their group and flow: 3.5 KB.
    assert sizes[drain_function_name(env.stage.stage_name)] < 1024


def test_the_drain_is_not_built_on_queues_it_would_not_derive(env: Synthesized) -> None:
    # The function finds its queues by the environment's name; the stack must hand it those.
    queues = {
        (flow, group.value): q for (flow, group), q in env.stage.stateful.fallback.queues.items()
    }
    government, media = queues[("emergency", "government")], queues[("emergency", "media")]
    swapped = {
        **queues,
        ("emergency", "government"): media,
        ("emergency", "media"): government,
    }
    unused = cast(Any, None)  # refused before anything else is built
    for name, given in (("someone-else", queues), (env.stage.stage_name, swapped)):
        with pytest.raises(ValueError, match="the drain derives the fallback queues"):
            Drain(
                Stack(App(), "Elsewhere"),
                "Drain",
                env_name=name,
                platform=unused,
                broker_host="broker",
                broker_secret=unused,
                secrets_key=unused,
                queues=given,
                audit_queue=unused,
            )
