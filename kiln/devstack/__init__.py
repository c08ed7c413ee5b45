"""The embedded service stack: real NATS (JetStream), PostgreSQL and Redis from pip packages,
for `kiln dev` and the test suite on a machine that runs none of them."""

from kiln.devstack.stack import DevStack, StackState, embedded_services

__all__ = ["DevStack", "StackState", "embedded_services"]
