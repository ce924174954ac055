"""One CDK Stage per environment: the unit that `cdk deploy '<env>/*'` deploys."""

from __future__ import annotations

from aws_cdk import Environment, Stage, Tags
from constructs import Construct

from fabric.routing import default_routing_table
from fabric.topology import PLATFORM_USER, definitions
from stacks.config import EnvironmentConfig
from stacks.services_stack import ServicesStack
from stacks.stateful_stack import StatefulStack


class FabricStage(Stage):
    """All stacks of one environment, named ``<env>/Stateful`` (and later ``<env>/...``)."""

    def __init__(self, scope: Construct, *, config: EnvironmentConfig) -> None:
        super().__init__(
            scope,
            config.stage_name,
            env=Environment(account=config.account, region=config.region),
        )
        Tags.of(self).add("project", "messaging-fabric")
        Tags.of(self).add("environment", config.name)
        topology = definitions(default_routing_table())
        usernames = tuple(user["name"] for user in topology["users"])
        self.stateful = StatefulStack(self, "Stateful", config=config, broker_usernames=usernames)
        self.services = ServicesStack(
            self,
            "Services",
            config=config,
            stateful=self.stateful,
            topology=topology,
            router_user=PLATFORM_USER,
        )
