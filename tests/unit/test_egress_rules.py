"""The sandboxes' egress rules, as iptables arguments: NATS first, then the refusals."""

from __future__ import annotations

from kiln.invoker.egress import Endpoint, egress_rules
from kiln.settings import EgressMode

NATS = [Endpoint("10.0.0.5", 4222), Endpoint("fd00::5", 4222)]
DATABASE = Endpoint("127.0.0.1", 5432, local=True)
REDIS = Endpoint("10.0.0.7", 6379)
RESET = ["-j", "REJECT", "--reject-with", "tcp-reset"]


def test_allow_refuses_the_platforms_ports_and_nothing_else() -> None:
    rules = egress_rules(
        EgressMode.ALLOW, nats=NATS, refused=[DATABASE, REDIS], metrics_port=9464, family=4
    )
    assert rules == [
        ["-d", "10.0.0.5", "-p", "tcp", "--dport", "4222", "-j", "ACCEPT"],
        # On loopback, a service answers on every address of the host: all of them refuse.
        ["-m", "addrtype", "--dst-type", "LOCAL", "-p", "tcp", "--dport", "5432", *RESET],
        ["-d", "10.0.0.7", "-p", "tcp", "--dport", "6379", *RESET],
        ["-p", "tcp", "--dport", "9464", *RESET],
    ]


def test_deny_lets_only_nats_through_in_each_family() -> None:
    for family, nats in ((4, "10.0.0.5"), (6, "fd00::5")):
        rules = egress_rules(
            EgressMode.DENY, nats=NATS, refused=[DATABASE], metrics_port=9464, family=family
        )
        assert rules == [
            ["-d", nats, "-p", "tcp", "--dport", "4222", "-j", "ACCEPT"],
            ["-p", "tcp", *RESET],
            ["-j", "REJECT"],
        ]
