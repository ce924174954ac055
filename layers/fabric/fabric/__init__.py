"""Messaging Fabric: the domain (envelope, routing, topology) and adapters behind narrow ports."""
